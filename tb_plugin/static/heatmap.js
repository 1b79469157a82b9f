// The heatmap: layers or variables (rows, model order, input at the top) x
// step buckets (columns), coloured by log10 of the statistic through a
// 256-colour table. Cells are written into an ImageData of one pixel per cell
// and scaled up without smoothing, so 10^6 cells cost one drawImage, not 10^6
// fillRects. Class marks are patterns, so they stand out in print.
//
// What the classes are, which pattern marks each, and whether a NaN means "no
// value" all come from the server's answer (keras_vg.heatmap_marks): this
// module knows how to draw a pattern, not which class it stands for.

import {sizeCanvas} from './canvas.js';
import {readCode} from './model.js';

export const BACKGROUND = [255, 255, 255];
export const NON_FINITE = [255, 0, 255]; // magenta: NaN or inf where it means a broken value
export const UNDEFINED = [200, 200, 200]; // grey: NaN meaning "undefined" or "no record"
const LABEL_FONT = '11px sans-serif';

// Viridis, sampled at 9 points and interpolated to 256 entries.
const VIRIDIS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];

/** @return {Array<Array<number>>} 256 RGB triples */
function makeLut() {
  const lut = [];
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (VIRIDIS.length - 1);
    const k = Math.min(Math.floor(t), VIRIDIS.length - 2);
    const f = t - k;
    lut.push([0, 1, 2].map((c) => Math.round(VIRIDIS[k][c] * (1 - f) + VIRIDIS[k + 1][c] * f)));
  }
  return lut;
}
export const LUT = makeLut();

/**
 * Colour range of a decoded heatmap: [lo, hi] in log10 (or linear for fractions).
 * @param {Object} heatmap from model.decodeHeatmap
 * @return {{lo: number, hi: number, linear: boolean}}
 */
export function colourRange(heatmap) {
  const linear = heatmap.json.scale === 'linear';
  if (linear) return {lo: 0, hi: 1, linear};
  const special = heatmap.json.encoding.special;
  const reserved = new Set(Object.values(special));
  let lo = Infinity;
  let hi = -Infinity;
  for (const code of heatmap.codes) {
    if (reserved.has(code)) continue;
    if (code < lo) lo = code;
    if (code > hi) hi = code;
  }
  const scale = heatmap.json.encoding.scale;
  if (lo > hi) return {lo: -1, hi: 1, linear};
  if (lo === hi) return {lo: lo / scale - 0.5, hi: hi / scale + 0.5, linear};
  return {lo: lo / scale, hi: hi / scale, linear};
}

function cellColour(code, heatmap, range) {
  const cell = readCode(code, heatmap.json.encoding);
  if (cell.kind === 'missing') return BACKGROUND;
  if (cell.kind === 'nan' && heatmap.json.nan_is_absent) return UNDEFINED;
  if (cell.kind === 'nan' || cell.kind === 'pos_inf' || cell.kind === 'neg_inf') return NON_FINITE;
  if (cell.kind === 'negative') return UNDEFINED;
  const x = range.linear ? cell.value : cell.kind === 'zero' ? range.lo : cell.log10;
  const t = (x - range.lo) / (range.hi - range.lo || 1);
  return LUT[Math.max(0, Math.min(255, Math.round(t * 255)))];
}

/**
 * RGB of every possible int16 code, so that colouring 10^6 cells is a table
 * lookup rather than 10^6 decodings.
 * @return {Uint8Array} 65536 x 3 bytes, indexed by code + 32768
 */
function colourTable(heatmap, range) {
  const table = new Uint8Array(65536 * 3);
  for (let code = -32768; code < 32768; code++) {
    table.set(cellColour(code, heatmap, range), 3 * (code + 32768));
  }
  return table;
}

// Line segments of each hatch pattern in an 8 x 8 tile (keras_vg.heatmap_marks.MARKS names them).
const HATCHES = {
  diagonal: [[0, 8, 8, 0], [-4, 4, 4, -4], [4, 12, 12, 4]],
  antidiagonal: [[0, 0, 8, 8], [-4, 4, 4, 12], [4, -4, 12, 4]],
  cross: [[0, 8, 8, 0], [0, 0, 8, 8]],
  vertical: [[4, 0, 4, 8]],
};

/**
 * A repeating pattern: `dots`, or one of `HATCHES`.
 * @param {CanvasRenderingContext2D} ctx
 * @param {string} kind
 * @return {CanvasPattern}
 */
function makePattern(ctx, kind) {
  const tile = document.createElement('canvas');
  tile.width = 8;
  tile.height = 8;
  const g = tile.getContext('2d');
  if (kind === 'dots') {
    g.fillStyle = '#fff';
    g.fillRect(1, 1, 5, 5);
    g.fillStyle = '#000';
    g.fillRect(2, 2, 3, 3);
    return ctx.createPattern(tile, 'repeat');
  }
  // Thin white lines edged in black show on any colour, leave most of the
  // cell's colour visible, and print as texture in monochrome.
  for (const [width, colour] of [[2.2, 'rgba(0,0,0,0.7)'], [1, '#fff']]) {
    g.lineWidth = width;
    g.strokeStyle = colour;
    for (const [x1, y1, x2, y2] of HATCHES[kind] || []) {
      g.beginPath();
      g.moveTo(x1, y1);
      g.lineTo(x2, y2);
      g.stroke();
    }
  }
  return ctx.createPattern(tile, 'repeat');
}

/**
 * The classes a heatmap marks, most serious first, with their patterns and
 * whether their regions are also outlined and their tiny cells ringed.
 * @param {Object} json a /heatmap answer
 * @return {Array<{code: number, name: string, pattern: string, outlined: boolean, ringed: boolean}>}
 */
export function markedClasses(json) {
  return json.marked.map((code) => {
    const name = json.regions[code];
    return {code, name, pattern: json.marks[name], outlined: json.outlined.includes(name),
      ringed: json.ringed.includes(name)};
  });
}

/**
 * Geometry of a heatmap drawn in a canvas of CSS width `width`.
 * @param {number} width CSS pixels
 * @param {number} rows number of variables
 * @return {{x0: number, y0: number, w: number, rowPx: number, h: number, height: number, labels: boolean}}
 */
export function layout(width, rows) {
  const labelWidth = Math.min(220, Math.max(60, Math.floor(width * 0.25)));
  // One to 16 pixels per row; many variables make the canvas taller, and it scrolls.
  const rowPx = Math.max(1, Math.min(16, Math.floor(480 / Math.max(1, rows))));
  const y0 = 22;
  const h = rows * rowPx;
  return {
    x0: labelWidth, y0, w: Math.max(1, width - labelWidth - 8), rowPx, h,
    height: y0 + h + 8, labels: rowPx >= 9,
  };
}

/**
 * Draws a decoded heatmap into `canvas`.
 * @param {HTMLCanvasElement} canvas
 * @param {Object} heatmap from model.decodeHeatmap
 * @param {{row: ?number, column: ?number, box: ?Object}} selection
 * @return {{layout: Object, range: Object}}
 */
export function drawHeatmap(canvas, heatmap, selection = {}) {
  const width = canvas.parentElement.clientWidth;
  const geometry = layout(width, heatmap.rows);
  const dpr = window.devicePixelRatio || 1;
  const ctx = sizeCanvas(canvas, width, geometry.height);
  ctx.fillStyle = `rgb(${BACKGROUND.join(',')})`;
  ctx.fillRect(0, 0, width, geometry.height);
  const range = colourRange(heatmap);
  const {rows, columns} = heatmap;
  if (rows === 0 || columns === 0) return {layout: geometry, range};

  // One pixel per cell, then scaled up.
  const cells = document.createElement('canvas');
  cells.width = columns;
  cells.height = rows;
  const image = cells.getContext('2d').createImageData(columns, rows);
  const marked = markedClasses(heatmap.json);
  const masks = new Map(marked.map((mark) => [mark.code,
    {alpha: new Uint8ClampedArray(rows * columns * 4), used: false}]));
  const table = colourTable(heatmap, range);
  for (let i = 0; i < rows * columns; i++) {
    const t = 3 * (heatmap.codes[i] + 32768);
    image.data[4 * i] = table[t];
    image.data[4 * i + 1] = table[t + 1];
    image.data[4 * i + 2] = table[t + 2];
    image.data[4 * i + 3] = 255;
    const mask = masks.get(heatmap.classes[i]);
    if (mask) {
      mask.alpha[4 * i + 3] = 255;
      mask.used = true;
    }
  }
  cells.getContext('2d').putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  const {x0, y0, w, h} = geometry;
  ctx.drawImage(cells, x0, y0, w, h);

  // Class marks: a mask of the marked cells, scaled like the cells, filled with a pattern.
  for (const {code, pattern, outlined} of marked) {
    const mask = masks.get(code);
    if (!mask.used) continue;
    const maskCanvas = document.createElement('canvas');
    maskCanvas.width = columns;
    maskCanvas.height = rows;
    maskCanvas.getContext('2d').putImageData(new ImageData(mask.alpha, columns, rows), 0, 0);
    const layer = document.createElement('canvas');
    layer.width = Math.max(1, Math.round(w * dpr));
    layer.height = Math.max(1, Math.round(h * dpr));
    const l = layer.getContext('2d');
    l.imageSmoothingEnabled = false;
    l.drawImage(maskCanvas, 0, 0, layer.width, layer.height);
    l.globalCompositeOperation = 'source-in';
    l.fillStyle = makePattern(l, pattern);
    l.fillRect(0, 0, layer.width, layer.height);
    ctx.drawImage(layer, x0, y0, w, h);
    // Outlined too where the server says so (exploding: to differ from vanishing at a glance).
    if (outlined) outlineMask(ctx, heatmap.classes, code, geometry, columns);
  }
  // Ringed where cells are tiny: one step of one row must not hide among a million cells.
  const ringed = new Set(marked.filter((mark) => mark.ringed).map((mark) => mark.code));
  ringSmallRegions(ctx, heatmap.classes, ringed, geometry, columns);

  drawAxes(ctx, heatmap, geometry);
  drawSelection(ctx, selection, geometry, columns);
  return {layout: geometry, range};
}

/**
 * Rings the cells of the `ringed` classes where cells are smaller than a few
 * pixels (one step of one variable among 10^6 cells), so that they cannot hide.
 */
function ringSmallRegions(ctx, classes, ringed, geometry, columns) {
  const {x0, y0, w, rowPx} = geometry;
  const cw = w / columns;
  if (cw >= 6 && rowPx >= 6) return; // cells are big enough to see
  const MIN = 9;
  const MAX_RINGS = 2000; // beyond that, regions are large and the patterns show them
  const rings = [];
  for (let i = 0; i < classes.length && rings.length <= MAX_RINGS; i++) {
    if (ringed.has(classes[i])) rings.push(i);
  }
  if (rings.length > MAX_RINGS) return;
  ctx.save();
  for (const [width, colour] of [[3, '#fff'], [1.5, '#000']]) {
    ctx.lineWidth = width;
    ctx.strokeStyle = colour;
    ctx.beginPath();
    for (const i of rings) {
      const cx = x0 + ((i % columns) + 0.5) * cw;
      const cy = y0 + (Math.floor(i / columns) + 0.5) * rowPx;
      const half = Math.max(MIN, cw, rowPx) / 2;
      ctx.rect(cx - half, cy - half, 2 * half, 2 * half);
    }
    ctx.stroke();
  }
  ctx.restore();
}

function outlineMask(ctx, classes, region, geometry, columns) {
  const {x0, y0, w, rowPx} = geometry;
  const cw = w / columns;
  ctx.save();
  ctx.strokeStyle = '#000';
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  const rows = classes.length / columns;
  const at = (r, c) => r >= 0 && r < rows && c >= 0 && c < columns && classes[r * columns + c] === region;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < columns; c++) {
      if (!at(r, c)) continue;
      const x = x0 + c * cw;
      const y = y0 + r * rowPx;
      if (!at(r - 1, c)) { ctx.moveTo(x, y); ctx.lineTo(x + cw, y); }
      if (!at(r + 1, c)) { ctx.moveTo(x, y + rowPx); ctx.lineTo(x + cw, y + rowPx); }
      if (!at(r, c - 1)) { ctx.moveTo(x, y); ctx.lineTo(x, y + rowPx); }
      if (!at(r, c + 1)) { ctx.moveTo(x + cw, y); ctx.lineTo(x + cw, y + rowPx); }
    }
  }
  ctx.stroke();
  ctx.restore();
}

function drawAxes(ctx, heatmap, geometry) {
  const {x0, y0, w, rowPx} = geometry;
  const json = heatmap.json;
  ctx.fillStyle = '#333';
  ctx.font = LABEL_FONT;
  ctx.textBaseline = 'bottom';
  if (json.step_start.length) {
    ctx.textAlign = 'left';
    ctx.fillText(`step ${json.step_start[0]}`, x0, y0 - 4);
    ctx.textAlign = 'right';
    ctx.fillText(`step ${json.step_end[json.step_end.length - 1]}`, x0 + w, y0 - 4);
  }
  ctx.textAlign = 'right';
  ctx.fillText('input ↓', x0 - 6, y0 - 4);
  if (!geometry.labels) return;
  // Canvas text is never parsed as HTML: untrusted names are safe here.
  ctx.textBaseline = 'middle';
  const room = x0 - 8;
  json.names.forEach((name, row) => {
    let label = name;
    while (label.length > 4 && ctx.measureText(label).width > room) label = label.slice(0, -2);
    if (label !== name) label = `…${name.slice(name.length - label.length + 1)}`;
    ctx.fillText(label, x0 - 4, y0 + row * rowPx + rowPx / 2);
  });
}

function drawSelection(ctx, selection, geometry, columns) {
  const {x0, y0, w, h, rowPx} = geometry;
  const cw = w / columns;
  ctx.save();
  ctx.strokeStyle = '#e00';
  ctx.lineWidth = 1.5;
  if (selection.box) {
    const {row0, row1, column0, column1} = selection.box;
    ctx.strokeRect(x0 + column0 * cw - 1, y0 + row0 * rowPx - 1, (column1 - column0 + 1) * cw + 2,
      (row1 - row0 + 1) * rowPx + 2);
  }
  ctx.setLineDash([4, 3]);
  if (selection.column !== null && selection.column !== undefined) {
    ctx.strokeRect(x0 + selection.column * cw, y0, Math.max(cw, 1), h);
  }
  if (selection.row !== null && selection.row !== undefined) {
    ctx.strokeRect(x0, y0 + selection.row * rowPx, w, Math.max(rowPx, 1));
  }
  ctx.restore();
}

/**
 * Which cell is under a point of the canvas.
 * @param {Object} geometry from `layout`
 * @param {Object} heatmap from model.decodeHeatmap
 * @param {number} x CSS pixels from the canvas' left
 * @param {number} y CSS pixels from the canvas' top
 * @return {?{row: number, column: number}}
 */
export function cellAt(geometry, heatmap, x, y) {
  const {x0, y0, w, h, rowPx} = geometry;
  if (x < x0 || x >= x0 + w || y < y0 || y >= y0 + h) return null;
  const column = Math.min(heatmap.columns - 1, Math.floor(((x - x0) / w) * heatmap.columns));
  const row = Math.min(heatmap.rows - 1, Math.floor((y - y0) / rowPx));
  return {row, column};
}

/**
 * Draws the colour scale: the 256 colours with the range's ends below.
 * @param {HTMLCanvasElement} canvas
 * @param {{lo: number, hi: number, linear: boolean}} range
 */
export function drawScale(canvas, range) {
  const width = 160;
  const ctx = sizeCanvas(canvas, width, 30);
  for (let i = 0; i < width; i++) {
    const [r, g, b] = LUT[Math.round((i / (width - 1)) * 255)];
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(i, 2, 1, 12);
  }
  ctx.fillStyle = '#333';
  ctx.font = LABEL_FONT;
  ctx.textBaseline = 'top';
  const label = (v) => (range.linear ? v.toFixed(2) : `1e${v.toFixed(1)}`);
  ctx.textAlign = 'left';
  ctx.fillText(label(range.lo), 0, 16);
  ctx.textAlign = 'right';
  ctx.fillText(label(range.hi), width, 16);
}

/**
 * Draws one legend swatch: a colour, a pattern over it, or both.
 * @param {HTMLCanvasElement} canvas
 * @param {?string} pattern a pattern name (`dots` or a hatch), or null
 * @param {?Array<number>} colour RGB, or null
 */
export function drawSwatch(canvas, pattern, colour) {
  const size = 16;
  const ctx = sizeCanvas(canvas, size, size);
  ctx.fillStyle = colour ? `rgb(${colour.join(',')})` : '#777';
  ctx.fillRect(0, 0, size, size);
  if (pattern) {
    ctx.fillStyle = makePattern(ctx, pattern);
    ctx.fillRect(0, 0, size, size);
  }
  ctx.strokeStyle = '#000';
  ctx.lineWidth = 1;
  ctx.strokeRect(0.5, 0.5, size - 1, size - 1);
}

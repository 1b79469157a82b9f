// Small canvas line charts with a log10 y axis: the gradient-flow profile
// (statistic vs depth) and the per-layer curves (statistics vs step).
// Lines differ by dash as well as colour, so they read in monochrome too.

import {sizeCanvas} from './canvas.js';
import {formatValue} from './model.js';

const STYLES = [
  {colour: '#1f77b4', dash: []},
  {colour: '#d62728', dash: [6, 3]},
  {colour: '#2ca02c', dash: [2, 2]},
  {colour: '#9467bd', dash: [8, 3, 2, 3]},
  {colour: '#8c564b', dash: [1, 3]},
  {colour: '#ff7f0e', dash: [10, 4]},
  {colour: '#17becf', dash: [3, 6]},
];
const EVENT_STYLES = {
  clip_on: {colour: '#d62728', dash: []},
  clip_off: {colour: '#d62728', dash: [4, 3]},
  skip: {colour: '#555', dash: [1, 2]},
  alert: {colour: '#ff7f0e', dash: []},
  warning: {colour: '#ff7f0e', dash: [4, 3]},
};
const PAD = {left: 58, right: 12, top: 10, bottom: 30};

/**
 * Draws line series on a log10 y axis.
 * @param {HTMLCanvasElement} canvas sized to its parent's width
 * @param {{series: Array<{label: string, xs: Array<number>, ys: Array<number>,
 *     low: ?Array<number>}>, xLabel: string, vlines: ?Array<{x: number, kind: string}>,
 *     cursor: ?number, height: ?number}} spec `low` draws a min..max band
 * @return {{xOf: function(number): number, invX: function(number): number}}
 */
export function drawChart(canvas, spec) {
  const width = Math.max(120, canvas.parentElement.clientWidth);
  const height = spec.height || 220;
  const ctx = sizeCanvas(canvas, width, height);
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, width, height);

  // Ranges over the finite positive values (log axis).
  let xMin = Infinity; let xMax = -Infinity; let yMin = Infinity; let yMax = -Infinity;
  for (const s of spec.series) {
    s.xs.forEach((x, i) => {
      xMin = Math.min(xMin, x); xMax = Math.max(xMax, x);
      for (const y of [s.ys[i], s.low ? s.low[i] : s.ys[i]]) {
        if (y > 0 && Number.isFinite(y)) {
          yMin = Math.min(yMin, Math.log10(y)); yMax = Math.max(yMax, Math.log10(y));
        }
      }
    });
  }
  if (!Number.isFinite(xMin)) { xMin = 0; xMax = 1; }
  if (xMin === xMax) { xMin -= 0.5; xMax += 0.5; }
  if (!Number.isFinite(yMin)) { yMin = -1; yMax = 1; }
  if (yMin === yMax) { yMin -= 0.5; yMax += 0.5; }
  // A little room above and below, so lines do not hide under the frame.
  const pad = 0.05 * (yMax - yMin);
  yMin -= pad;
  yMax += pad;
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const xOf = (x) => PAD.left + ((x - xMin) / (xMax - xMin)) * plotW;
  const yOf = (logY) => PAD.top + (1 - (logY - yMin) / (yMax - yMin)) * plotH;

  drawFrame(ctx, {xMin, xMax, yMin, yMax, xOf, yOf, plotW, plotH, width, height, xLabel: spec.xLabel});

  for (const line of spec.vlines || []) {
    const style = EVENT_STYLES[line.kind] || EVENT_STYLES.alert;
    ctx.save();
    ctx.strokeStyle = style.colour;
    ctx.setLineDash(style.dash);
    ctx.beginPath();
    ctx.moveTo(xOf(line.x), PAD.top);
    ctx.lineTo(xOf(line.x), PAD.top + plotH);
    ctx.stroke();
    ctx.restore();
  }
  if (spec.cursor !== null && spec.cursor !== undefined) {
    ctx.save();
    ctx.strokeStyle = '#000';
    ctx.setLineDash([2, 2]);
    ctx.beginPath();
    ctx.moveTo(xOf(spec.cursor), PAD.top);
    ctx.lineTo(xOf(spec.cursor), PAD.top + plotH);
    ctx.stroke();
    ctx.restore();
  }

  spec.series.forEach((s, k) => {
    const style = STYLES[k % STYLES.length];
    if (s.low) drawBand(ctx, s, style, xOf, yOf);
    ctx.save();
    ctx.strokeStyle = style.colour;
    ctx.lineWidth = 1.5;
    ctx.setLineDash(style.dash);
    ctx.beginPath();
    let pen = false;
    s.xs.forEach((x, i) => {
      const y = s.ys[i];
      if (!(y > 0 && Number.isFinite(y))) { pen = false; return; }
      const px = xOf(x); const py = yOf(Math.log10(y));
      if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      pen = true;
    });
    ctx.stroke();
    ctx.setLineDash([]);
    // Non-finite points: a cross on the top edge, where "too large" lives.
    ctx.fillStyle = style.colour;
    ctx.font = 'bold 11px sans-serif';
    ctx.textAlign = 'center';
    s.xs.forEach((x, i) => {
      const y = s.ys[i];
      if (Number.isNaN(y) || y === Infinity) ctx.fillText('×', xOf(x), PAD.top + 6);
    });
    if (s.xs.length === 1 && s.ys[0] > 0) {
      ctx.fillRect(xOf(s.xs[0]) - 2, yOf(Math.log10(s.ys[0])) - 2, 4, 4);
    }
    ctx.restore();
  });
  drawKey(ctx, spec.series, width);
  const invX = (px) => xMin + ((px - PAD.left) / plotW) * (xMax - xMin);
  return {xOf, invX};
}

function drawBand(ctx, s, style, xOf, yOf) {
  ctx.save();
  ctx.globalAlpha = 0.18;
  ctx.fillStyle = style.colour;
  s.xs.forEach((x, i) => {
    const hi = s.ys[i]; const lo = s.low[i];
    if (hi > 0 && lo > 0 && Number.isFinite(hi) && Number.isFinite(lo)) {
      const top = yOf(Math.log10(hi));
      ctx.fillRect(xOf(x) - 1, top, 2, Math.max(1, yOf(Math.log10(lo)) - top));
    }
  });
  ctx.restore();
}

function drawFrame(ctx, f) {
  ctx.strokeStyle = '#999';
  ctx.lineWidth = 1;
  ctx.strokeRect(PAD.left, PAD.top, f.plotW, f.plotH);
  ctx.fillStyle = '#333';
  ctx.font = '11px sans-serif';
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  const first = Math.ceil(f.yMin); const last = Math.floor(f.yMax);
  const every = Math.max(1, Math.ceil((last - first + 1) / 6));
  for (let e = first; e <= last; e += every) {
    ctx.fillText(formatValue(Math.pow(10, e)), PAD.left - 4, f.yOf(e));
    ctx.strokeStyle = '#eee';
    ctx.beginPath();
    ctx.moveTo(PAD.left + 1, f.yOf(e));
    ctx.lineTo(PAD.left + f.plotW - 1, f.yOf(e));
    ctx.stroke();
  }
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (let i = 0; i <= 4; i++) {
    const x = f.xMin + ((f.xMax - f.xMin) * i) / 4;
    ctx.fillText(String(Math.round(x)), f.xOf(x), PAD.top + f.plotH + 3);
  }
  ctx.fillText(f.xLabel || '', PAD.left + f.plotW / 2, f.height - 12);
}

function drawKey(ctx, series, width) {
  ctx.font = '11px sans-serif';
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  series.forEach((s, k) => {
    const style = STYLES[k % STYLES.length];
    const y = PAD.top + 10 + 14 * k;
    const x = width - PAD.right - 6;
    ctx.fillStyle = 'rgba(255,255,255,0.8)';
    ctx.fillRect(x - ctx.measureText(s.label).width - 34, y - 7, ctx.measureText(s.label).width + 38, 14);
    ctx.fillStyle = '#333';
    ctx.fillText(s.label, x, y);
    ctx.save();
    ctx.strokeStyle = style.colour;
    ctx.lineWidth = 1.5;
    ctx.setLineDash(style.dash);
    ctx.beginPath();
    ctx.moveTo(x - ctx.measureText(s.label).width - 30, y);
    ctx.lineTo(x - ctx.measureText(s.label).width - 6, y);
    ctx.stroke();
    ctx.restore();
  });
}

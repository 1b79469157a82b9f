// Entry point of the Gradients tab. TensorBoard loads this module in a
// same-origin iframe and calls render(). The iframe starts hidden at zero
// size, so drawing waits for a ResizeObserver to report a real width.

import {drawChart} from './charts.js';
import {cellAt, drawHeatmap, layout} from './heatmap.js';
import {readFragment, writeFragment} from './fragment.js';
import {decodeHeatmap, fetchJSON, formatValue, readCode, toNumber} from './model.js';
import {STAT_LABELS, alertsList, choice, dataNotices, el, fillTooltip, legend, notice, select} from './views.js';

const ROWS = [{value: 'layer', text: 'layers'}, {value: 'variable', text: 'variables'}];

/** One run's view: heatmap, profile, per-layer curves and alerts. */
class Panel {
  /**
   * @param {Object} runInfo an entry of /runs
   * @param {{stat: string, by: string}} view the toolbar's choices (read at each load)
   */
  constructor(runInfo, view) {
    this.run = runInfo.run;
    this.stats = runInfo.heatmap_stats;
    this.view = view;
    this.token = 0;
    this.heatmap = null;
    this.geometry = null;
    this.events = [];
    this.selection = {name: null, step: null, stepEnd: null, row: null, column: null, box: null};
    this.requestedColumns = 0;

    this.root = el('section', 'kvg-panel');
    this.root.append(el('h2', 'kvg-run-name', this.run));
    this.notices = el('div', 'kvg-notices');
    this.legend = el('div', 'kvg-legend');
    this.wrap = el('div', 'kvg-heatmap-wrap');
    this.canvas = el('canvas', 'kvg-heatmap');
    this.tooltip = el('div', 'kvg-tooltip');
    this.tooltip.hidden = true;
    this.wrap.append(this.canvas, this.tooltip);
    this.profileCaption = el('figcaption', null, 'Gradient flow');
    this.profileBox = el('div', 'kvg-chart-box');
    this.profileCanvas = el('canvas', 'kvg-profile');
    this.profileBox.append(this.profileCanvas);
    this.curvesCaption = el('figcaption');
    this.rowLabel = el('span', null, 'Layer ');
    this.layerSelect = el('select', 'kvg-layer-select');
    this.layerSelect.addEventListener('change', () => this.pick({name: this.layerSelect.value}));
    this.curvesBox = el('div', 'kvg-chart-box');
    this.curvesCanvas = el('canvas', 'kvg-curves');
    this.curvesBox.append(this.curvesCanvas);
    const profile = el('figure', 'kvg-figure');
    profile.append(this.profileCaption, this.profileBox);
    const curves = el('figure', 'kvg-figure');
    const curvesHead = el('figcaption');
    curvesHead.append(this.rowLabel, this.layerSelect);
    curves.append(curvesHead, this.curvesBox, this.curvesCaption);
    const charts = el('div', 'kvg-charts');
    charts.append(profile, curves);
    this.alerts = el('div', 'kvg-alerts-box');
    this.root.append(this.notices, this.legend, this.wrap, charts, el('h3', null, 'Alerts'), this.alerts);

    this.canvas.addEventListener('mousemove', (event) => this.hover(event));
    this.canvas.addEventListener('mouseleave', () => { this.tooltip.hidden = true; });
    this.canvas.addEventListener('click', (event) => this.clickCell(event));
    this.profileCanvas.addEventListener('click', (event) => this.clickProfile(event));
    this.lastWidth = 0;
    new ResizeObserver(() => this.resized()).observe(this.wrap);
  }

  /** Redraws at the new size; asks for new columns when the width changed a lot. */
  resized() {
    const width = this.wrap.clientWidth;
    if (width === 0 || width === this.lastWidth) return;
    this.lastWidth = width;
    if (!this.heatmap) {
      this.load();
      return;
    }
    this.draw();
    this.drawCharts();
    const wanted = this.columnsWanted();
    if (this.heatmap.json.num_steps > this.heatmap.columns &&
        Math.abs(wanted - this.requestedColumns) > 0.1 * this.requestedColumns) {
      clearTimeout(this.resizeTimer);
      this.resizeTimer = setTimeout(() => this.load(), 250);
    }
  }

  columnsWanted() {
    return Math.max(1, Math.floor(layout(this.wrap.clientWidth, 1).w));
  }

  /** Fetches everything for the current statistic and rows, dropping answers that arrive too late. */
  async load() {
    if (this.wrap.clientWidth === 0) return; // hidden: the ResizeObserver calls again
    const token = ++this.token;
    const started = performance.now();
    this.root.dataset.state = 'loading';
    this.root.setAttribute('aria-busy', 'true');
    this.requestedColumns = this.columnsWanted();
    let json;
    try {
      json = await fetchJSON('heatmap', {run: this.run, stat: this.view.stat, by: this.view.by,
        columns: this.requestedColumns});
    } catch (error) {
      if (token !== this.token) return;
      this.notices.replaceChildren(notice(error.message, 'error'));
      this.root.dataset.state = 'error';
      this.root.removeAttribute('aria-busy');
      return;
    }
    if (token !== this.token) return;
    this.heatmap = decodeHeatmap(json);
    this.fillLayerSelect();
    this.notices.replaceChildren(...dataNotices(json));
    this.draw();
    // Seen in the browser's performance timeline (and by benchmarks/plugin_scale.py).
    performance.measure('keras-vg: heatmap requested to drawn', {start: started});
    this.root.dataset.state = 'drawn';

    const [classification, events] = await Promise.all([
      fetchJSON('classification', {run: this.run}).catch((error) => ({episodes: [], error: error.message})),
      fetchJSON('events', {run: this.run}).catch(() => ({events: [], retention: null})),
    ]);
    if (token !== this.token) return;
    this.events = events.events;
    if (classification.error) this.notices.append(notice(classification.error, 'error'));
    this.notices.append(...dataNotices({retention: events.retention}, 'event records'));
    this.alerts.replaceChildren(alertsList(classification.episodes, this.events, (item) => this.jump(item)));
    if (this.selection.name === null) {
      const first = classification.episodes.find((e) => this.rowsOf(e.names).length);
      this.selection.name = first ? json.names[this.rowsOf(first.names)[0]] : json.names[0];
      if (this.selection.name !== undefined) this.layerSelect.value = this.selection.name;
    }
    await this.drawCharts(true);
    if (token === this.token) {
      this.root.dataset.state = 'complete';
      this.root.removeAttribute('aria-busy');
    }
  }

  fillLayerSelect() {
    const json = this.heatmap.json;
    this.rowLabel.textContent = json.rows === 'layer' ? 'Layer ' : 'Variable ';
    this.layerSelect.replaceChildren(...json.names.map((name) => {
      const option = el('option', null, name);
      option.value = name;
      return option;
    }));
    if (!json.names.includes(this.selection.name)) {
      // From variables to layers (or back): keep to the same place in the model.
      const rows = this.selection.name === null ? [] : this.rowsOf([this.selection.name]);
      this.selection.name = rows.length ? json.names[rows[0]] : json.names.length ? json.names[0] : null;
    }
    if (this.selection.name !== null) this.layerSelect.value = this.selection.name;
  }

  /**
   * The heatmap rows that hold any of `names`: rows named so, or, for layer
   * rows, the layers of the variables named (alerts name variables).
   * @param {Array<string>} names
   * @return {Array<number>} rows, ascending
   */
  rowsOf(names) {
    const json = this.heatmap.json;
    const rows = new Set();
    for (const name of names) {
      let row = json.names.indexOf(name);
      if (row < 0 && json.row_variables) row = json.row_variables.findIndex((vs) => vs.includes(name));
      if (row >= 0) rows.add(row);
    }
    return [...rows].sort((a, b) => a - b);
  }

  draw() {
    if (!this.heatmap) return;
    const started = performance.now();
    const selection = {...this.selection, row: this.rowOf(this.selection.name)};
    const {layout, range} = drawHeatmap(this.canvas, this.heatmap, selection);
    this.geometry = layout;
    const drawn = legend(this.heatmap.json, range);
    this.legend.replaceWith(drawn);
    this.legend = drawn;
    performance.measure('keras-vg: heatmap drawn', {start: started});
  }

  rowOf(name) {
    const row = this.heatmap ? this.heatmap.json.names.indexOf(name) : -1;
    return row < 0 ? null : row;
  }

  hover(event) {
    const cell = this.heatmap && this.geometry && cellAt(this.geometry, this.heatmap, event.offsetX, event.offsetY);
    if (!cell) {
      this.tooltip.hidden = true;
      return;
    }
    const json = this.heatmap.json;
    const index = cell.row * this.heatmap.columns + cell.column;
    const code = readCode(this.heatmap.codes[index], json.encoding);
    const start = json.step_start[cell.column];
    const end = json.step_end[cell.column];
    let value = code.kind === 'missing' ? 'no record' : formatValue(code.value);
    if (code.kind === 'value') value = `≈ ${value}`;
    if (code.kind === 'nan' && json.nan_is_absent) value = 'undefined';
    const region = this.heatmap.classes[index];
    const lines = [[json.rows, json.names[cell.row]]];
    if (json.row_variables) lines.push(['variables', json.row_variables[cell.row].join(', ')]);
    lines.push(
      [start === end ? 'step' : 'steps', start === end ? String(start) : `${start}–${end} (max)`],
      [STAT_LABELS[json.stat] || json.stat, value],
      ['class', json.regions[region] || String(region)],
    );
    fillTooltip(this.tooltip, lines);
    this.tooltip.hidden = false;
    const x = Math.min(event.offsetX + 14, this.wrap.clientWidth - this.tooltip.offsetWidth - 4);
    this.tooltip.style.left = `${Math.max(0, x)}px`;
    this.tooltip.style.top = `${event.offsetY + 14}px`;
  }

  clickCell(event) {
    const cell = this.heatmap && this.geometry && cellAt(this.geometry, this.heatmap, event.offsetX, event.offsetY);
    if (!cell) return;
    const json = this.heatmap.json;
    this.pick({name: json.names[cell.row], step: json.step_start[cell.column], stepEnd: json.step_end[cell.column],
      column: cell.column, box: null});
  }

  clickProfile(event) {
    if (!this.profileChart || !this.heatmap) return;
    const rect = this.profileCanvas.getBoundingClientRect();
    const depth = Math.round(this.profileChart.invX(event.clientX - rect.left));
    const name = this.heatmap.json.names[Math.max(0, Math.min(this.heatmap.rows - 1, depth))];
    this.pick({name});
  }

  /** Jumps to an alert: its first row and step range, boxed on the heatmap. */
  jump(item) {
    const json = this.heatmap.json;
    const rows = this.rowsOf(item.names);
    const columns = [];
    json.step_start.forEach((start, c) => {
      if (json.step_end[c] >= item.first_step && start <= item.last_step) columns.push(c);
    });
    const box = rows.length && columns.length ? {
      row0: rows[0], row1: rows[rows.length - 1],
      column0: columns[0], column1: columns[columns.length - 1],
    } : null;
    this.pick({name: rows.length ? json.names[rows[0]] : this.selection.name,
      step: item.first_step, stepEnd: item.last_step, column: columns.length ? columns[0] : null, box});
    this.wrap.scrollIntoView({block: 'nearest'});
  }

  pick(change) {
    Object.assign(this.selection, change);
    if (this.selection.name !== null) this.layerSelect.value = this.selection.name;
    this.draw();
    this.drawCharts(true);
  }

  /** Draws the profile and the curves; refetches them when `refetch`. */
  async drawCharts(refetch = false) {
    if (!this.heatmap) return;
    const token = this.token;
    const json = this.heatmap.json;
    const stat = json.stat;
    if (refetch) {
      const [profile, curves] = await Promise.all([
        fetchJSON('profile', {run: this.run, stat, by: this.view.by, step: this.selection.step,
          step_end: this.selection.stepEnd}).catch(() => null),
        this.fetchCurves(),
      ]);
      if (token !== this.token) return;
      this.profile = profile;
      this.curves = curves;
    }
    if (this.profile && this.profileBox.clientWidth > 0) {
      const values = this.profile.values.map(toNumber);
      this.profileChart = drawChart(this.profileCanvas, {
        series: [{label: STAT_LABELS[stat] || stat, xs: values.map((_, i) => i), ys: values}],
        xLabel: `depth (${json.rows} index, input at left)`,
        cursor: this.rowOf(this.selection.name),
      });
      const at = this.profile.step_end !== this.profile.step ?
        `steps ${this.profile.step}–${this.profile.step_end} (max)` : `step ${this.profile.step}`;
      this.profileCaption.textContent = `Gradient flow: ${STAT_LABELS[stat] || stat} per ${json.rows} vs depth ` +
        `at ${at}. Click a heatmap cell to choose the step.`;
    }
    if (this.curves && this.curvesBox.clientWidth > 0) {
      const vlines = this.events.filter((e) => e.kind !== 'alert' && e.kind !== 'warning')
        .map((e) => ({x: e.step, kind: e.kind}));
      drawChart(this.curvesCanvas, {
        series: this.curves, xLabel: 'step', vlines, cursor: this.selection.step,
      });
      const kinds = [...new Set(vlines.map((v) => v.kind))];
      this.curvesCaption.textContent = kinds.length ?
        `Vertical lines: ${kinds.map((k) => k.replace('_', ' ')).join(', ')} (solid red: clipping on, dashed red: off, dotted: skipped step).` :
        'No clipping events recorded.';
    }
  }

  async fetchCurves() {
    const name = this.selection.name;
    if (name === null) return [];
    const answers = await Promise.all(this.stats.map((stat) =>
      fetchJSON('series', {run: this.run, stat, name, by: this.view.by, columns: 600}).catch(() => null)));
    // A statistic that is zero throughout (no non-finite gradients) has no
    // place on a log axis; leave it out rather than list an invisible line.
    const drawable = (s) => s.max.some((v) => toNumber(v) !== 0);
    return answers.filter(Boolean).filter(drawable).map((s) => ({
      label: STAT_LABELS[s.stat] || s.stat,
      xs: s.steps,
      ys: s.max.map(toNumber),
      low: s.downsampled ? s.min.map(toNumber) : null,
    }));
  }
}

function addStylesheet() {
  const link = document.createElement('link');
  link.rel = 'stylesheet';
  link.href = new URL('./style.css', import.meta.url).href;
  document.head.append(link);
}

/** Builds the tab. Called once by TensorBoard's plugin entry page. */
export async function render() {
  addStylesheet();
  const app = el('div', 'kvg-app');
  document.body.append(app);
  const toolbar = el('header', 'kvg-toolbar');
  const status = el('div', 'kvg-notices');
  const panels = el('div', 'kvg-panels');
  app.append(toolbar, status, panels);
  // What the URL fragment saved (a reload, a shared link); otherwise the server's suggestion.
  const saved = readFragment();
  const view = {stat: saved.stat || 'grad_norm', by: ROWS.some((r) => r.value === saved.by) ? saved.by : 'layer'};
  const state = {run: saved.run || null, compare: saved.compare || '', panels: [], runs: []};
  const save = () => writeFragment({run: state.run, compare: state.compare, stat: view.stat, by: view.by});

  const build = () => {
    save();
    panels.replaceChildren();
    state.panels = [...new Set([state.run, state.compare])].filter(Boolean).map((run) => {
      const panel = new Panel(state.runs.find((r) => r.run === run), view);
      panels.append(panel.root);
      return panel;
    });
    panels.classList.toggle('kvg-side-by-side', state.panels.length > 1);
    for (const panel of state.panels) panel.load();
  };
  const reload = () => {
    save();
    for (const panel of state.panels) panel.load();
  };

  const refresh = async () => {
    let listing;
    try {
      listing = await fetchJSON('runs');
    } catch (error) {
      status.replaceChildren(notice(error.message, 'error'));
      return;
    }
    state.runs = listing.runs;
    status.replaceChildren(...listing.runs.filter((r) => r.error).map((r) => notice(`${r.run}: ${r.error}`, 'error')));
    const runs = listing.runs.filter((r) => r.heatmap_stats.length);
    if (!runs.length) {
      toolbar.replaceChildren();
      status.append(notice('No keras-vg data yet. Add keras_vg.GradientMonitor(log_dir) to model.fit, ' +
        'and point tensorboard --logdir at a folder above log_dir.'));
      return;
    }
    // The page opens on what matters: a run with findings, or else the newest (the server's choice).
    if (!runs.some((r) => r.run === state.run)) {
      state.run = runs.some((r) => r.run === listing.opening) ? listing.opening : runs[0].run;
    }
    if (!runs.some((r) => r.run === state.compare)) state.compare = '';
    const stats = listing.stats.filter((s) => runs.some((r) => r.heatmap_stats.includes(s)));
    if (!stats.includes(view.stat)) view.stat = stats[0];
    const findings = (n) => (n === 1 ? ' (1 finding)' : n ? ` (${n} findings)` : '');
    const runOptions = runs.map((r) => ({value: r.run, text: r.run + findings(r.findings)}));
    toolbar.replaceChildren(
      select('Run', runOptions, state.run, (run) => { state.run = run; build(); }).root,
      select('Compare with', [{value: '', text: '(none)'}, ...runOptions], state.compare,
        (run) => { state.compare = run; build(); }).root,
      select('Statistic', stats.map((s) => ({value: s, text: STAT_LABELS[s] || s})), view.stat,
        (stat) => { view.stat = stat; reload(); }).root,
      choice('Rows', ROWS, view.by, (by) => { view.by = by; reload(); }),
      reloadButton(refresh),
    );
    build();
  };
  await refresh();
}

function reloadButton(onClick) {
  const button = el('button', 'kvg-reload', 'Reload');
  button.type = 'button';
  button.title = 'Read new data (TensorBoard\'s own reload button does not reach this tab)';
  button.addEventListener('click', onClick);
  return button;
}

// Pure DOM builders. Every piece of text goes through textContent: run,
// layer and variable names are untrusted and must never be parsed as HTML.

import {NON_FINITE, UNDEFINED, drawScale, drawSwatch, markedClasses} from './heatmap.js';

export const STAT_LABELS = {
  grad_norm: 'gradient norm',
  grad_max_abs: 'max |gradient|',
  grad_nonfinite: 'non-finite gradients',
  weight_norm: 'weight norm',
  update_ratio: 'update ratio',
  dead_fraction: 'dead fraction',
  saturation_fraction: 'saturation',
  global_grad_norm: 'global gradient norm',
};

/**
 * Creates an element.
 * @param {string} tag
 * @param {?string} className
 * @param {?string} text set through textContent
 * @return {HTMLElement}
 */
export function el(tag, className = null, text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null && text !== undefined) node.textContent = text;
  return node;
}

/**
 * A labelled <select>.
 * @param {string} label
 * @param {Array<{value: string, text: string}>} options
 * @param {string} selected
 * @param {function(string)} onChange
 * @return {{root: HTMLElement, select: HTMLSelectElement}}
 */
export function select(label, options, selected, onChange) {
  const root = el('label', 'kvg-field');
  root.append(el('span', 'kvg-field-label', label));
  const node = el('select');
  for (const {value, text} of options) {
    const option = el('option', null, text);
    option.value = value;
    node.append(option);
  }
  node.value = selected;
  node.addEventListener('change', () => onChange(node.value));
  root.append(node);
  return {root, select: node};
}

/**
 * A group of radio buttons: every choice one click away.
 * @param {string} label
 * @param {Array<{value: string, text: string}>} options
 * @param {string} selected
 * @param {function(string)} onChange
 * @return {HTMLElement}
 */
export function choice(label, options, selected, onChange) {
  const root = el('fieldset', 'kvg-field kvg-choice');
  root.append(el('legend', 'kvg-field-label', label));
  const name = `kvg-choice-${label.toLowerCase().replace(/[^a-z]/g, '')}`;
  for (const {value, text} of options) {
    const option = el('label', 'kvg-choice-option');
    const input = el('input');
    input.type = 'radio';
    input.name = name;
    input.value = value;
    input.checked = value === selected;
    input.addEventListener('change', () => { if (input.checked) onChange(value); });
    option.append(input, el('span', null, text));
    root.append(option);
  }
  return root;
}

/**
 * The heatmap's legend: its colour scale, then every mark it can draw, named.
 * @param {Object} json the /heatmap answer
 * @param {{lo: number, hi: number, linear: boolean}} range from heatmap.colourRange
 * @return {HTMLElement}
 */
export function legend(json, range) {
  const root = el('div', 'kvg-legend');
  const scale = el('canvas', 'kvg-legend-scale');
  drawScale(scale, range);
  root.append(scale);
  const entries = markedClasses(json).map((mark) => [mark.pattern, null, mark.name]);
  // Values off the colour scale: NaN is a broken value, or (for some statistics) no value.
  entries.push(json.nan_is_absent ? [null, UNDEFINED, 'undefined / no record'] :
    [null, NON_FINITE, 'non-finite value']);
  for (const [pattern, colour, text] of entries) {
    const item = el('span', 'kvg-legend-item');
    const swatch = el('canvas', 'kvg-legend-swatch');
    drawSwatch(swatch, pattern, colour);
    item.append(swatch, el('span', 'kvg-legend-label', text));
    root.append(item);
  }
  return root;
}

/**
 * A notice line (downsampling, retention, errors).
 * @param {string} text
 * @param {string} kind "info", "warn" or "error"
 * @return {HTMLElement}
 */
export function notice(text, kind = 'info') {
  const node = el('p', `kvg-notice kvg-notice-${kind}`, text);
  node.setAttribute('role', kind === 'info' ? 'status' : 'alert');
  return node;
}

/**
 * The notices a heatmap answer calls for.
 * @param {Object} json a /heatmap or /events answer
 * @param {string} what "records" or "events"
 * @return {Array<HTMLElement>}
 */
export function dataNotices(json, what = 'records') {
  const notices = [];
  if (json.downsampled) {
    notices.push(notice(
      `Downsampled: ${json.num_steps} recorded steps shown in ${json.columns} columns; ` +
      `each column shows the ${json.reduction}, so a one-step spike or NaN stays visible.`));
  }
  const retention = json.retention;
  if (retention && retention.may_be_cut) {
    notices.push(notice(
      `TensorBoard kept only ${retention.limit} ${what} of this series and dropped the rest ` +
      `(its default retention). Restart it with ${retention.hint} to see every step.`, 'warn'));
  }
  return notices;
}

/**
 * Names a range of layers compactly.
 * @param {Array<string>} names
 * @return {string}
 */
export function nameRange(names) {
  if (!names || names.length === 0) return '(no layer)';
  if (names.length === 1) return names[0];
  return `${names[0]} … ${names[names.length - 1]} (${names.length})`;
}

/**
 * The alerts list: region episodes and recorded warnings; a click jumps to one.
 * Recorded "alert" events are the monitor's live copies of the same episodes
 * (same rules, keras_vg.detect), so they are not listed twice.
 * @param {Array<Object>} episodes from /classification
 * @param {Array<Object>} events from /events
 * @param {function(Object)} onPick called with the episode or event
 * @return {HTMLElement}
 */
export function alertsList(episodes, events, onPick) {
  const list = el('ul', 'kvg-alerts');
  const items = [
    ...episodes.map((e) => ({...e, source: 'episode'})),
    ...events.filter((e) => e.kind === 'warning')
      .map((e) => ({...e, source: 'event', first_step: e.step, last_step: e.step,
        names: e.names || (e.name ? [e.name] : [])})),
  ].sort((a, b) => a.first_step - b.first_step);
  if (items.length === 0) {
    list.append(el('li', 'kvg-alert-none', 'No vanishing, exploding or non-finite regions found.'));
    return list;
  }
  for (const item of items) {
    const li = el('li', `kvg-alert kvg-alert-${String(item.kind).replace(/[^a-z_-]/gi, '')}`);
    const button = el('button', 'kvg-alert-button');
    button.type = 'button';
    button.append(
      el('span', 'kvg-alert-kind', String(item.kind)),
      el('span', 'kvg-alert-where', nameRange(item.names)),
      el('span', 'kvg-alert-when', item.first_step === item.last_step ?
        `step ${item.first_step}` : `steps ${item.first_step}–${item.last_step}`),
      el('span', 'kvg-alert-message', item.message || ''),
    );
    button.addEventListener('click', () => onPick(item));
    li.append(button);
    list.append(li);
  }
  return list;
}

/**
 * Fills the tooltip with the lines given, each one a text node.
 * @param {HTMLElement} tooltip
 * @param {Array<[string, string]>} rows label, value
 */
export function fillTooltip(tooltip, rows) {
  tooltip.replaceChildren();
  for (const [label, value] of rows) {
    const line = el('div', 'kvg-tooltip-row');
    line.append(el('span', 'kvg-tooltip-label', label), el('span', 'kvg-tooltip-value', value));
    tooltip.append(line);
  }
}

// Data access for the Gradients tab: fetching the plugin's JSON routes and
// decoding the compact heatmap payload. No DOM here.

/**
 * Fetches one of the plugin's JSON routes (relative URL: the entry page's
 * <base> points at /data/plugin/keras_vg/).
 * @param {string} route e.g. "heatmap"
 * @param {Object<string, string|number>} params query parameters
 * @return {Promise<Object>} the parsed JSON
 * @throws {Error} with the server's `error` text on a non-2xx answer
 */
export async function fetchJSON(route, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) query.set(key, String(value));
  }
  const response = await fetch(`${route}?${query}`);
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    throw new Error((body && body.error) || `${route}: HTTP ${response.status}`);
  }
  return body;
}

/**
 * Turns a JSON number, or the strings TensorBoard writes for non-finite
 * values ("NaN", "Infinity", "-Infinity"), into a number.
 * @param {number|string|null} value
 * @return {number}
 */
export function toNumber(value) {
  if (typeof value === 'number') return value;
  if (value === 'Infinity') return Infinity;
  if (value === '-Infinity') return -Infinity;
  return NaN;
}

function base64Bytes(text) {
  const binary = atob(text || '');
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/**
 * Decodes a /heatmap answer: int16 log10 codes and int8 region codes,
 * row-major [rows = variables, columns = step buckets].
 * @param {Object} json the /heatmap answer
 * @return {{rows: number, columns: number, codes: Int16Array,
 *     classes: Int8Array, json: Object}}
 */
export function decodeHeatmap(json) {
  const bytes = base64Bytes(json.values);
  const view = new DataView(bytes.buffer);
  const codes = new Int16Array(bytes.length / 2);
  for (let i = 0; i < codes.length; i++) codes[i] = view.getInt16(2 * i, true);
  return {rows: json.names.length, columns: json.columns, codes, classes: decodeRegions(json), json};
}

/**
 * Region codes of a /heatmap answer as one Int8Array [rows x columns]:
 * `classes` is either {bytes: base64 int8} or {runs: [row, first, last, code, ...]}.
 * @param {Object} json the /heatmap answer
 * @return {Int8Array}
 */
function decodeRegions(json) {
  const size = json.names.length * json.columns;
  const encoded = json.classes || {};
  if (encoded.bytes !== undefined) return new Int8Array(base64Bytes(encoded.bytes).buffer);
  const classes = new Int8Array(size);
  const runs = encoded.runs || [];
  for (let i = 0; i + 3 < runs.length; i += 4) {
    const offset = runs[i] * json.columns;
    classes.fill(runs[i + 3], offset + runs[i + 1], offset + runs[i + 2] + 1);
  }
  return classes;
}

/**
 * What one heatmap code stands for.
 * @param {number} code an int16 code from `decodeHeatmap`
 * @param {Object} encoding the answer's `encoding` ({scale, special})
 * @return {{kind: string, log10: number, value: number}} kind is "value",
 *     "zero", "missing", "nan", "pos_inf", "neg_inf" or "negative"
 */
export function readCode(code, encoding) {
  for (const [kind, special] of Object.entries(encoding.special)) {
    if (code === special) {
      const value = {zero: 0, pos_inf: Infinity, neg_inf: -Infinity}[kind];
      return {kind, log10: NaN, value: value === undefined ? NaN : value};
    }
  }
  const log10 = code / encoding.scale;
  return {kind: 'value', log10, value: Math.pow(10, log10)};
}

/**
 * Formats a value with 3 significant digits, or names a non-finite one.
 * @param {number} value
 * @return {string}
 */
export function formatValue(value) {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return '+inf';
  if (value === -Infinity) return '-inf';
  if (value === 0) return '0';
  const magnitude = Math.abs(value);
  return magnitude >= 1e4 || magnitude < 1e-3 ? value.toExponential(2) : value.toPrecision(3);
}

// The page's choices in TensorBoard's URL fragment, so that a reload (or a
// copied link) shows the same run, statistic and rows.
//
// TensorBoard keeps its own state in the fragment (`#keras_vg&key=value&...`,
// keys and values URI-encoded) and reserves the keys `p.<plugin>.<key>` for
// plugins: it hands them to a plugin's frame through its
// `experimental.GetURLPluginData` message. It offers no message to write
// them; the tab's frame is same-origin, so it replaces its own keys in the
// host page's fragment directly, with history.replaceState (no new history
// entry, no hashchange), and leaves every other key as it was.

const PREFIX = 'p.keras_vg.';

/** @return {Window} TensorBoard's page, or this one when opened alone */
function hostWindow() {
  try {
    return window.parent && window.parent.location.href ? window.parent : window;
  } catch (error) {
    return window; // not same-origin: keep the state in our own fragment
  }
}

/**
 * Splits a fragment the way TensorBoard does: `tab&key=value&...`.
 * @param {string} hash location.hash
 * @return {Array<[?string, string]>} [key, value] pairs in order; the key is null for the bare tab name
 */
function parse(hash) {
  const pairs = [];
  for (const part of hash.replace(/^#/, '').split('&')) {
    if (!part) continue;
    const [key, value, ...rest] = part.split('=');
    try {
      if (value === undefined) pairs.push([null, decodeURIComponent(key)]);
      else if (!rest.length) pairs.push([decodeURIComponent(key), decodeURIComponent(value)]);
    } catch (error) {
      // a malformed escape: not ours to repair, leave it out
    }
  }
  return pairs;
}

/**
 * The page's state saved in the fragment.
 * @return {Object<string, string>} e.g. {run: 'run1', stat: 'grad_norm', by: 'layer'}
 */
export function readFragment() {
  const state = {};
  for (const [key, value] of parse(hostWindow().location.hash)) {
    if (key !== null && key.startsWith(PREFIX)) state[key.slice(PREFIX.length)] = value;
  }
  return state;
}

/**
 * Saves the page's state in the fragment, replacing what it saved before.
 * @param {Object<string, ?string>} state empty and null values are left out
 */
export function writeFragment(state) {
  const host = hostWindow();
  const kept = parse(host.location.hash).filter(([key]) => key === null || !key.startsWith(PREFIX));
  for (const [key, value] of Object.entries(state)) {
    if (value !== null && value !== undefined && value !== '') kept.push([PREFIX + key, String(value)]);
  }
  const hash = kept.map(([key, value]) => (key === null ? encodeURIComponent(value) :
    `${encodeURIComponent(key)}=${encodeURIComponent(value)}`)).join('&');
  const url = new URL(host.location.href);
  url.hash = hash;
  if (url.href !== host.location.href) host.history.replaceState(host.history.state, '', url.href);
}

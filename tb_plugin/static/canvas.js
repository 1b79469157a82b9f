// Canvas set-up shared by the heatmap, its legend and the charts.

/**
 * Sizes a canvas to `width` x `height` CSS pixels, with a backing store at the
 * device's pixel ratio so that lines and text stay sharp, and returns its 2-D
 * context scaled so that drawing is in CSS pixels.
 * @param {HTMLCanvasElement} canvas
 * @param {number} width CSS pixels
 * @param {number} height CSS pixels
 * @return {CanvasRenderingContext2D}
 */
export function sizeCanvas(canvas, width, height) {
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

// The "Image" view: for each dropped, pasted or picked image, the captions of every served captioner side by
// side, the concept boxes over the picture (hover to highlight, a score slider to filter) and the labels as
// bars with the model's threshold marked and adjustable.

import { api, ApiError, imageForm } from './api.js';
import { clear, fmt, h, svg } from './dom.js';

let served = { caption: ['lightcap', 'ucm-captioner'], concepts: true, labels: true };

// What the server serves (from GET /v1/models): which captioners to ask, whether concepts/labels exist.
export function setServed(models) {
  const byKind = (kind) => models.filter((m) => m.kind === kind).map((m) => m.name);
  const order = (name) => (name === 'lightcap' ? 0 : name === 'ucm-captioner' ? 1 : 2);
  served = {
    caption: byKind('caption').sort((a, b) => order(a) - order(b)),
    concepts: byKind('concepts').length > 0,
    labels: byKind('labels').length > 0,
  };
}

export function initImageView(root) {
  const input = root.querySelector('#image-files');
  const drop = root.querySelector('#drop');
  const results = root.querySelector('#image-results');
  const show = (files) => {
    const list = [...files].filter((f) => f && f.size !== undefined);
    if (!list.length) return;
    clear(results);
    list.forEach((file, i) => results.append(imageCard(file, i)));
  };
  input.addEventListener('change', () => { show(input.files); input.value = ''; });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    show(e.dataTransfer.files);
  });
  document.addEventListener('paste', (e) => {
    if (root.hidden || !e.clipboardData) return;
    const files = [...e.clipboardData.files];
    if (files.length) { e.preventDefault(); show(files); }
  });
}

function imageCard(file, index) {
  const errors = h('div.errors', { role: 'alert' });
  const failures = new Map(); // message -> the parts that failed with it (one line per distinct message)
  const fail = (what, err) => {
    const text = err instanceof ApiError ? err.text : String(err.message || err);
    if (!failures.has(text)) failures.set(text, []);
    failures.get(text).push(what);
    clear(errors).append(...[...failures].map(([message, parts]) =>
      h('p.error', {}, h('strong', {}, `${parts.join(', ')}: `), message)));
  };
  const stage = h('div.stage', {}, h('p.muted', {}, 'loading…'));
  const boxes = h('div.concepts');
  const captions = h('div.captions');
  const labels = h('div.labels');
  const versions = h('p.versions.muted');
  const card = h('article.card.image-card', { 'aria-label': `results for ${file.name || 'pasted image'}`, dataset: { index } },
    h('h2', {}, file.name || 'pasted image'), errors,
    h('div.image-grid', {}, h('div', {}, stage, boxes), h('div', {}, captions, labels)), versions);

  const used = {};
  const noteVersion = (r) => { used[r.model] = r.version; versions.textContent = 'models: ' + Object.entries(used).map(([n, v]) => `${n}@${v}`).join(', '); };

  const picture = showPicture(file, stage).catch((err) => { clear(stage); fail('picture', err); });
  for (const model of served.caption) {
    const column = h('section.caption', { dataset: { model } }, h('h3', {}, model), h('p.muted', {}, 'captioning…'));
    captions.append(column);
    api(`/v1/caption?model=${encodeURIComponent(model)}`, { method: 'POST', body: imageForm(file) })
      .then((body) => { const r = body.results[0]; noteVersion(r); renderCaption(column, r); })
      .catch((err) => { column.lastChild.textContent = 'no caption'; fail(`caption (${model})`, err); });
  }
  if (served.concepts) {
    api('/v1/concepts', { method: 'POST', body: imageForm(file) })
      .then(async (body) => { const r = body.results[0]; noteVersion(r); await picture; renderConcepts(stage, boxes, r); })
      .catch((err) => fail('concepts', err));
  }
  if (served.labels) {
    api('/v1/labels', { method: 'POST', body: imageForm(file) })
      .then((body) => { const r = body.results[0]; noteVersion(r); renderLabels(labels, r); })
      .catch((err) => fail('labels', err));
  }
  return card;
}

// The browser shows PNG/JPEG/WebP/GIF/BMP itself; for anything else (TIFF, 16-bit) the server's own intake
// renders a PNG preview (POST /ui/preview, same checks and key as the API).
async function showPicture(file, stage) {
  const img = h('img', { alt: file.name || 'pasted image' });
  const loaded = (src) => new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error('the browser cannot show this file'));
    img.src = src;
  });
  try {
    await loaded(URL.createObjectURL(file));
  } catch {
    const q = new URLSearchParams({ filename: file.name || 'upload' });
    const blob = await api(`/ui/preview?${q}`, {
      method: 'POST', body: file, headers: { 'Content-Type': file.type && file.type.startsWith('image/') ? file.type : 'application/octet-stream' }, as: 'blob',
    });
    await loaded(URL.createObjectURL(blob));
  }
  clear(stage).append(img);
}

function renderCaption(column, r) {
  const t = r.timings_ms || {};
  clear(column).append(
    h('h3', {}, `${r.model}@${r.version}`),
    h('p.caption-text', {}, r.caption),
    h('p.muted', {}, `score ${fmt(r.score)} (mean log-probability per token)`),
    h('table.timings', {},
      h('caption', {}, 'timings (ms)'),
      h('tbody', {}, ['decode_ms', 'preprocess_ms', 'queue_ms', 'inference_ms'].map((k) =>
        h('tr', {}, h('th', { scope: 'row' }, k.replace('_ms', '')), h('td', {}, fmt(t[k], 1)))),
      h('tr', {}, h('th', { scope: 'row' }, 'batch size'), h('td', {}, t.batch_size ?? '–')))),
  );
}

const COLOURS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#0f9ea8', '#c71585', '#808000', '#9a6324', '#000075'];

function renderConcepts(stage, panel, r) {
  const concepts = r.concepts || [];
  const width = r.input?.width || 1;
  const height = r.input?.height || 1;
  const words = [...new Set(concepts.map((c) => c.concept))];
  const colour = (word) => COLOURS[words.indexOf(word) % COLOURS.length];
  const overlay = svg('svg', { class: 'boxes', viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': 'concept boxes' });
  stage.append(overlay);
  const slider = h('input', { type: 'range', id: `min-score-${uid()}`, min: 0, max: 1, step: 0.01, value: 0 });
  const shown = h('output', { for: slider.id }, '0.00');
  const list = h('ul.concept-list');
  const countLine = h('p.counts');
  const highlight = (i, on) => {
    overlay.querySelectorAll(`[data-i="${i}"]`).forEach((el) => el.classList.toggle('hot', on));
    list.querySelectorAll(`[data-i="${i}"]`).forEach((el) => el.classList.toggle('hot', on));
  };
  const stroke = Math.max(width, height) / 200;
  const draw = () => {
    const min = Number(slider.value);
    shown.textContent = min.toFixed(2);
    overlay.replaceChildren();
    clear(list);
    concepts.forEach((c, i) => {
      if (!(c.score >= min)) return;
      const [x1, y1, x2, y2] = c.box;
      const g = svg('g', { class: 'box', 'data-i': i, 'data-score': c.score, onmouseenter: () => highlight(i, true), onmouseleave: () => highlight(i, false) },
        svg('title', {}, `${c.concept} ${fmt(c.score, 2)}`),
        svg('rect', { x: x1, y: y1, width: Math.max(0, x2 - x1), height: Math.max(0, y2 - y1), stroke: colour(c.concept), 'stroke-width': stroke }));
      overlay.append(g);
      const item = h('li', { tabindex: 0, 'data-i': i, onmouseenter: () => highlight(i, true), onmouseleave: () => highlight(i, false), onfocus: () => highlight(i, true), onblur: () => highlight(i, false) },
        h('span.swatch', { style: `background:${colour(c.concept)}` }), `${c.concept} `, h('span.muted', {}, fmt(c.score, 2)),
        c.label ? h('span.muted', {}, ` (${c.label})`) : null);
      list.append(item);
    });
    const visible = overlay.childElementCount;
    countLine.textContent = `${visible} of ${concepts.length} boxes at score ≥ ${min.toFixed(2)}`;
    if (r.counts && Object.keys(r.counts).length) {
      countLine.textContent += ' · counts: ' + Object.entries(r.counts).map(([w, n]) => `${w} ×${n}`).join(', ');
    }
  };
  slider.addEventListener('input', draw);
  clear(panel).append(
    h('h3', {}, `concepts (${r.model}@${r.version})`),
    h('div.slider', {}, h('label', { for: slider.id }, 'minimum score'), slider, shown),
    countLine, list);
  draw();
}

function renderLabels(panel, r) {
  const names = Object.keys(r.labels);
  const slider = h('input', { type: 'range', id: `threshold-${uid()}`, min: 0, max: 1, step: 0.01, value: r.threshold });
  const shown = h('output', { for: slider.id });
  const predicted = h('p.predicted');
  const bars = h('div.bars', { role: 'list' });
  const rows = names.map((name) => {
    const p = r.labels[name];
    const row = h('div.bar-row', { role: 'listitem', dataset: { label: name } },
      h('span.bar-name', {}, name),
      h('span.bar', {}, h('span.fill', { style: `width:${(p * 100).toFixed(1)}%` })),
      h('span.bar-value', {}, fmt(p, 3)));
    bars.append(row);
    return [row, p, name];
  });
  const track = h('div.bar-track', {}, bars);
  const update = () => {
    const t = Number(slider.value);
    shown.textContent = t.toFixed(2);
    track.style.setProperty('--t', t);  // each bar draws the threshold line at --t
    const on = rows.filter(([row, p]) => { row.classList.toggle('on', p >= t); return p >= t; }).map(([, , n]) => n);
    predicted.textContent = `predicted at ${t.toFixed(2)}: ${on.join(', ') || 'none'}`;
  };
  slider.addEventListener('input', update);
  clear(panel).append(
    h('h3', {}, `labels (${r.model}@${r.version})`),
    h('div.slider', {}, h('label', { for: slider.id }, 'threshold'), slider, shown,
      h('button', { type: 'button', onclick: () => { slider.value = r.threshold; update(); } }, `model's (${fmt(r.threshold, 2)})`)),
    predicted, track);
  update();
}

let counter = 0;
function uid() { counter += 1; return counter; }

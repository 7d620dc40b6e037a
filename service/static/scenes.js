// The "Scenes" view (shown only when the server's OpenAPI document has /v1/scenes): a GeoTIFF uploaded or
// named by a server-side path is tiled, labelled (and optionally captioned) as a job; this view follows its
// progress and shows the label overlay on the scene's preview with its legend, and the GeoJSON to download.

import { api, ApiError, downloadURL } from './api.js';
import { clear, h } from './dom.js';

const SUCCESS = new Set(['succeeded', 'done', 'completed', 'finished']);
const FINAL = new Set([...SUCCESS, 'failed', 'cancelled', 'canceled', 'error']);

export function initScenesView(root) {
  const form = root.querySelector('#scene-form');
  const file = root.querySelector('#scene-file');
  const path = root.querySelector('#scene-path');
  const bar = root.querySelector('#scene-progress');
  const status = root.querySelector('#scene-status');
  const cancel = root.querySelector('#scene-cancel');
  const error = root.querySelector('#scene-error');
  const out = root.querySelector('#scene-output');
  const download = root.querySelector('#scene-download');
  let job = null;
  let timer = null;

  const showError = (err) => { error.textContent = err instanceof ApiError ? err.text : String(err.message || err); };
  const link = (name) => {
    const files = job.links?.files;
    if (typeof files === 'string') return `${files.replace(/\/$/, '')}/${name}`;
    if (files && typeof files === 'object' && typeof files[name] === 'string') return files[name];
    return `/v1/scenes/${job.id}/files/${name}`;
  };
  const showJob = (j) => {
    job = j;
    const progress = Number(j.progress) || 0;
    bar.value = progress;
    bar.textContent = `${Math.round(progress * 100)} %`;
    status.textContent = `scene ${j.id}: ${j.state}, ${Math.round(progress * 100)} %` + (j.error ? ` – ${j.error}` : '');
    cancel.disabled = FINAL.has(j.state);
  };

  const poll = async () => {
    try {
      const j = await api(selfLink());
      showJob(j);
      if (FINAL.has(j.state)) { if (SUCCESS.has(j.state)) await showResults(); return; }
    } catch (err) { showError(err); }
    timer = setTimeout(poll, 500);
  };
  const selfLink = () => job.links?.self || `/v1/scenes/${job.id}`;

  const image = async (name, alt) => {
    const blob = await api(link(name), { as: 'blob' });
    return h('img', { src: URL.createObjectURL(blob), alt });
  };

  // overlay.png is the scene's preview with each tile coloured by its label, and the legend; the plain
  // preview.png is fetched only when asked for.
  const showResults = async () => {
    clear(out);
    const overlay = await image('overlay.png', 'label overlay on the scene preview, with its legend');
    const stage = h('div.scene-stage', {}, overlay);
    let plain = null;
    const toggle = h('input', { type: 'checkbox', id: 'scene-plain' });
    toggle.addEventListener('change', async () => {
      try {
        if (toggle.checked && !plain) plain = await image('preview.png', 'scene preview');
        stage.replaceChildren(toggle.checked ? plain : overlay);
      } catch (err) { toggle.checked = false; showError(err); }
    });
    out.append(h('div.row', {}, toggle, h('label', { for: 'scene-plain' }, 'show the plain preview')), stage);
    try {
      out.append(summaryView(await api(link('summary.json'))));
    } catch (err) { showError(err); }
    const geojson = await api(job.links?.results || `/v1/scenes/${job.id}/results`, { as: 'text' });
    const features = JSON.parse(geojson).features?.length ?? 0;
    download.href = downloadURL(geojson, 'application/geo+json');
    download.download = `scene-${job.id}.geojson`;
    download.textContent = `Download GeoJSON (${features} features)`;
    download.hidden = false;
  };

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    error.textContent = '';
    clearTimeout(timer);
    clear(out); download.hidden = true;
    const body = new FormData();
    if (file.files.length) body.append('file', file.files[0], file.files[0].name);
    else if (path.value.trim()) body.append('path', path.value.trim());
    else { error.textContent = 'choose a GeoTIFF or give a path on the server'; return; }
    const q = new URLSearchParams();
    for (const name of ['tile', 'overlap', 'caption']) {
      const v = root.querySelector(`#scene-${name}`).value;
      if (v !== '') q.set(name, v);
    }
    try {
      showJob(await api(`/v1/scenes?${q}`, { method: 'POST', body }));
      poll();
    } catch (err) { showError(err); }
  });

  cancel.addEventListener('click', async () => {
    if (!job) return;
    try {
      const j = await api(`/v1/scenes/${job.id}`, { method: 'DELETE' });
      if (j) showJob(j);
    } catch (err) { showError(err); }
  });
}

// summary.json: its description first, then the label shares and object counts, then everything else.
function summaryView(summary) {
  const table = (caption, entries, digits) => h('table.summary', {}, h('caption', {}, caption),
    h('tbody', {}, entries.map(([k, v]) => h('tr', {}, h('th', { scope: 'row' }, k),
      h('td', {}, typeof v === 'number' && digits !== undefined ? `${(v * 100).toFixed(digits)} %` : String(v))))));
  const rest = [];
  const walk = (prefix, value) => {
    if (value && typeof value === 'object' && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) walk(prefix ? `${prefix}.${k}` : k, v);
    } else rest.push([prefix, Array.isArray(value) ? JSON.stringify(value) : value]);
  };
  const { description, label_fraction: shares, objects, warnings, ...other } = summary || {};
  walk('', other);
  return h('div.summary-view', {},
    description ? h('p.caption-text', {}, description) : null,
    (warnings || []).map((w) => h('p.error', {}, w)),
    shares ? table('share of tiles per label', Object.entries(shares).filter(([, v]) => v > 0), 1) : null,
    objects && Object.keys(objects).length ? table('objects', Object.entries(objects)) : null,
    h('details', {}, h('summary', {}, 'all of summary.json'), table('summary.json', rest.slice(0, 300))));
}

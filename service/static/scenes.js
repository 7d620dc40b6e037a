// The "Scenes" view (shown only when the server's OpenAPI document has /v1/scenes): a GeoTIFF uploaded or
// named by a server-side path is tiled, labelled (and optionally captioned) as a job; this view follows its
// progress and shows the label overlay on the scene's preview with its legend, and the GeoJSON to download.

import { api, ApiError, downloadURL } from './api.js';
import { clear, h } from './dom.js';

const FINAL = new Set(['succeeded', 'failed', 'cancelled']);

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
  const opacity = root.querySelector('#scene-opacity');
  let job = null;
  let timer = null;

  const showError = (err) => { error.textContent = err instanceof ApiError ? err.text : String(err.message || err); };
  const link = (name) => (job.links?.files ? `${job.links.files.replace(/\/$/, '')}/${name}` : `/v1/scenes/${job.id}/files/${name}`);
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
      if (FINAL.has(j.state)) { if (j.state === 'succeeded') await showResults(); return; }
    } catch (err) { showError(err); }
    timer = setTimeout(poll, 500);
  };
  const selfLink = () => job.links?.self || `/v1/scenes/${job.id}`;

  const image = async (name, alt) => {
    const blob = await api(link(name), { as: 'blob' });
    return h('img', { src: URL.createObjectURL(blob), alt });
  };

  const showResults = async () => {
    clear(out);
    const [preview, overlay] = await Promise.all([image('preview.png', 'scene preview'), image('overlay.png', 'label overlay with legend')]);
    overlay.classList.add('overlay');
    out.append(h('div.scene-stage', {}, preview, overlay));
    opacity.disabled = false;
    overlay.style.opacity = opacity.value;
    try {
      const summary = await api(link('summary.json'));
      out.append(h('details', { open: true }, h('summary', {}, 'summary'), summaryTable(summary)));
    } catch (err) { showError(err); }
    const geojson = await api(job.links?.results || `/v1/scenes/${job.id}/results`, { as: 'text' });
    const features = JSON.parse(geojson).features?.length ?? 0;
    download.href = downloadURL(geojson, 'application/geo+json');
    download.download = `scene-${job.id}.geojson`;
    download.textContent = `Download GeoJSON (${features} features)`;
    download.hidden = false;
  };

  opacity.addEventListener('input', () => {
    const overlay = out.querySelector('img.overlay');
    if (overlay) overlay.style.opacity = opacity.value;
  });

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

function summaryTable(summary) {
  const rows = [];
  const walk = (prefix, value) => {
    if (value && typeof value === 'object' && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) walk(prefix ? `${prefix}.${k}` : k, v);
    } else {
      rows.push(h('tr', {}, h('th', { scope: 'row' }, prefix), h('td', {}, Array.isArray(value) ? JSON.stringify(value) : String(value))));
    }
  };
  walk('', summary);
  return h('table.summary', {}, h('tbody', {}, rows.slice(0, 200)));
}

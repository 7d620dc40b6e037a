// The "Batch" view: upload a zip/tar of images (or several images) as a job, watch its progress, cancel it,
// page through the results with thumbnails, download the JSON lines.

import { api, ApiError, downloadURL } from './api.js';
import { zipEntries } from './zip.js';
import { clear, fmt, h } from './dom.js';

const FINAL = new Set(['succeeded', 'failed', 'cancelled']);
const PAGE = 12;

export function setBatchModels(root, names) {
  const select = root.querySelector('#batch-model');
  const current = select.value;
  clear(select).append(h('option', { value: '' }, 'default'), ...names.map((n) => h('option', { value: n }, n)));
  if (names.includes(current)) select.value = current;
}

export function initBatchView(root) {
  const form = root.querySelector('#batch-form');
  const files = root.querySelector('#batch-files');
  const status = root.querySelector('#batch-status');
  const bar = root.querySelector('#batch-progress');
  const cancel = root.querySelector('#batch-cancel');
  const list = root.querySelector('#batch-results');
  const pager = root.querySelector('#batch-pager');
  const download = root.querySelector('#batch-download');
  const error = root.querySelector('#batch-error');
  let job = null;
  let timer = null;
  let thumbs = new Map(); // entry name -> () => Promise<Blob>
  let lines = [];
  let page = 0;

  const showError = (err) => { error.textContent = err instanceof ApiError ? err.text : String(err.message || err); };
  const showJob = (j) => {
    job = j;
    const done = j.done + j.failed + j.refused;
    bar.value = j.progress;
    bar.textContent = `${Math.round(j.progress * 100)} %`;
    status.textContent = `job ${j.id}: ${j.state}, ${done} of ${j.total} (${Math.round(j.progress * 100)} %)` +
      (j.failed || j.refused ? `, ${j.failed} failed, ${j.refused} refused` : '') + (j.error ? ` – ${j.error}` : '');
    cancel.disabled = FINAL.has(j.state);
  };

  const poll = async () => {
    try {
      const j = await api(`/v1/jobs/${job.id}`);
      showJob(j);
      if (FINAL.has(j.state)) { await loadResults(); return; }
    } catch (err) { showError(err); }
    timer = setTimeout(poll, 400);
  };

  const loadResults = async () => {
    const text = await api(`/v1/jobs/${job.id}/results`, { as: 'text' });
    lines = text.split('\n').filter(Boolean).map((l) => JSON.parse(l));
    download.href = downloadURL(text, 'application/x-ndjson');
    download.download = `job-${job.id}.jsonl`;
    download.hidden = false;
    page = 0;
    await renderPage();
  };

  const renderPage = async () => {
    clear(list);
    const pages = Math.max(1, Math.ceil(lines.length / PAGE));
    const slice = lines.slice(page * PAGE, page * PAGE + PAGE);
    for (const line of slice) {
      const img = h('img.thumb', { alt: line.name, width: 64, height: 64, onerror: () => { img.hidden = true; } });
      const read = line.error ? null : thumbs.get(line.name);
      if (read) read().then((blob) => { img.src = URL.createObjectURL(blob); }).catch(() => { img.hidden = true; });
      else img.hidden = true;
      const body = line.error
        ? h('p.error', {}, `${line.error.type?.split('/').pop() || 'error'}: ${line.error.detail}`)
        : h('p', {}, h('span.caption-text', {}, line.caption), h('span.muted', {}, ` ${fmt(line.score, 2)} · ${line.model}@${line.version}`));
      list.append(h('li.result', {}, img, h('div', {}, h('strong', {}, `${line.index}. ${line.name}`), body)));
    }
    clear(pager).append(
      h('button', { type: 'button', disabled: page === 0, onclick: () => { page -= 1; renderPage(); } }, '‹ previous'),
      h('span', {}, ` page ${page + 1} of ${pages} (${lines.length} results) `),
      h('button', { type: 'button', disabled: page >= pages - 1, onclick: () => { page += 1; renderPage(); } }, 'next ›'));
  };

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    error.textContent = '';
    if (!files.files.length) { error.textContent = 'choose a zip or tar archive, or images, first'; return; }
    clearTimeout(timer);
    clear(list); clear(pager); download.hidden = true; lines = [];
    thumbs = new Map();
    const body = new FormData();
    for (const file of files.files) {
      body.append('files', file, file.name);
      if (/\.zip$/i.test(file.name)) {
        for (const [name, read] of await zipEntries(file).catch(() => new Map())) if (!thumbs.has(name)) thumbs.set(name, read);
      } else if (file.type.startsWith('image/')) {
        thumbs.set(file.name, async () => file);
      }
    }
    const model = root.querySelector('#batch-model').value;
    if (model) body.append('model', model);
    try {
      showJob(await api('/v1/jobs', { method: 'POST', body }));
      poll();
    } catch (err) { showError(err); }
  });

  cancel.addEventListener('click', async () => {
    if (!job) return;
    try { showJob(await api(`/v1/jobs/${job.id}`, { method: 'DELETE' })); } catch (err) { showError(err); }
  });
}

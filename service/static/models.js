// The "Models" view: every served model with its versions, aliases, device and key metrics; a reload button
// per model once an admin key is entered (POST /v1/models/{name}/reload).

import { api, ApiError, keys } from './api.js';
import { clear, fmt, h } from './dom.js';

const outcomes = new Map(); // model name -> the last reload's outcome, kept across re-renders
const KEY_METRICS = /cider|bleu|f1|r@1|accuracy|ap@|recall|precision|loss/i;

export function renderModels(root, body, config, reload) {
  const list = root.querySelector('#model-list');
  const note = root.querySelector('#models-note');
  note.textContent = [
    body.loading ? 'models are still loading' : '',
    body.default_caption_model ? `default captioner: ${body.default_caption_model}` : '',
    `serving alias: ${body.alias}`,
    ...Object.entries(body.failures || {}).map(([n, why]) => `${n} failed: ${why}`),
  ].filter(Boolean).join(' · ');
  const adminForm = root.querySelector('#admin-form');
  adminForm.hidden = !config.admin_routes;
  clear(list);
  for (const m of body.models) {
    const metrics = Object.entries(m.metrics || {}).filter(([, v]) => typeof v === 'number');
    const key = metrics.filter(([k]) => KEY_METRICS.test(k) && /^test_|^val_/.test(k)).slice(0, 6);
    const shown = key.length ? key : metrics.slice(0, 6);
    const result = h('p.reload-result', { role: 'status' }, outcomes.get(m.name) || '');
    const button = config.admin_routes && keys.admin
      ? h('button', { type: 'button', onclick: async () => {
        result.textContent = 'reloading…';
        try {
          const r = await api(`/v1/models/${encodeURIComponent(m.name)}/reload`, { method: 'POST', admin: true });
          outcomes.set(m.name, `${r.outcome}: version ${r.previous_version} → ${r.version}`);
          reload();
        } catch (err) { outcomes.set(m.name, err instanceof ApiError ? err.text : String(err)); }
        result.textContent = outcomes.get(m.name);
      } }, `Reload ${m.name}`)
      : null;
    list.append(h('article.card.model', { dataset: { model: m.name } },
      h('h3', {}, `${m.name}@${m.serving_version}`),
      h('dl', {},
        h('dt', {}, 'task'), h('dd', {}, `${m.task} (${m.kind})`),
        h('dt', {}, 'device'), h('dd', {}, m.device ?? 'not reported'),
        h('dt', {}, 'aliases'), h('dd', {}, Object.entries(m.aliases || {}).map(([a, v]) => `${a} → ${v}`).join(', ') || 'none'),
        h('dt', {}, 'profile'), h('dd', {}, m.profile ?? '–'),
        h('dt', {}, 'queue'), h('dd', {}, String(m.queue_depth ?? '–')),
        h('dt', {}, 'versions'), h('dd', {}, (m.versions || []).map((v) => v.version).filter((v) => v !== undefined).join(', ') || '–')),
      shown.length ? h('table.metrics', {}, h('caption', {}, 'metrics'),
        h('tbody', {}, shown.map(([k, v]) => h('tr', {}, h('th', { scope: 'row' }, k), h('td', {}, fmt(v, 4)))))) : null,
      button, result));
  }
}

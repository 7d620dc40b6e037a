// Entry module: the API key prompt, the tabs, and wiring of the views. No build step, no external files.

import { api, ApiError, keys, onUnauthorized } from './api.js';
import { initBatchView, setBatchModels } from './batch.js';
import { initImageView, setServed } from './image.js';
import { renderModels } from './models.js';
import { initScenesView } from './scenes.js';

const $ = (sel) => document.querySelector(sel);
let config = { api_key_required: false, admin_routes: false };
let started = false;

function selectTab(name, focus = false) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.dataset.view === name;
    tab.setAttribute('aria-selected', String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`#view-${tab.dataset.view}`).hidden = !on;
    if (on && focus) tab.focus();
  }
}

function initTabs() {
  const tabs = () => [...document.querySelectorAll('[role="tab"]')].filter((t) => !t.hidden);
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener('click', () => selectTab(tab.dataset.view));
    tab.addEventListener('keydown', (e) => {
      const list = tabs();
      const i = list.indexOf(tab);
      const next = e.key === 'ArrowRight' ? list[(i + 1) % list.length] : e.key === 'ArrowLeft' ? list[(i - 1 + list.length) % list.length] : null;
      if (next) { e.preventDefault(); selectTab(next.dataset.view, true); }
    });
  }
}

function askForKey(message = '') {
  $('#key-panel').hidden = false;
  $('#app').hidden = true;
  $('#key-error').textContent = message;
  $('#api-key').focus();
}

async function loadModels() {
  const body = await api('/v1/models');
  if (body.models.length || !body.loading) setServed(body.models); // while loading, ask for all and show what comes
  setBatchModels($('#view-batch'), body.models.filter((m) => m.kind === 'caption').map((m) => m.name));
  renderModels($('#view-models'), body, config, () => loadModels().catch(() => {}));
  return body;
}

async function start() {
  // Proves the key (when one is needed) and learns what is served; a 401 brings the prompt back.
  try {
    await loadModels();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return; // onUnauthorized has asked again
    $('#global-error').textContent = err instanceof ApiError ? err.text : String(err);
  }
  $('#key-panel').hidden = true;
  $('#app').hidden = false;
  if (!started) {
    started = true;
    initImageView($('#view-image'));
    initBatchView($('#view-batch'));
    initScenesView($('#view-scenes'));
  }
}

async function boot() {
  initTabs();
  onUnauthorized((err) => { keys.api = ''; askForKey(err.text); });
  $('#key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    keys.api = $('#api-key').value.trim();
    $('#api-key').value = '';
    start();
  });
  $('#change-key').addEventListener('click', () => askForKey());
  $('#admin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    keys.admin = $('#admin-key').value.trim();
    $('#admin-key').value = '';
    loadModels().catch((err) => { $('#models-note').textContent = err.text || String(err); });
  });
  try {
    const [cfg, openapi] = await Promise.all([api('/ui/config.json'), api('/openapi.json')]);
    config = cfg;
    $('#version').textContent = `v${cfg.version}`;
    // The Scenes tab exists only once the server has the route.
    $('#tab-scenes').hidden = !(openapi.paths && openapi.paths['/v1/scenes']);
  } catch (err) {
    $('#global-error').textContent = err instanceof ApiError ? err.text : String(err);
  }
  $('#change-key').hidden = !config.api_key_required;
  selectTab('image');
  if (config.api_key_required && !keys.api) askForKey();
  else start();
}

boot();

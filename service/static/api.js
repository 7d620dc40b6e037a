// Calls to the service's JSON API. Keys live only in this tab's sessionStorage; errors become ApiError with
// the problem+json `detail` (RFC 9457) so the page can show the server's own words.

const KEY = 'captioner.apiKey';
const ADMIN_KEY = 'captioner.adminKey';

export const keys = {
  get api() { return sessionStorage.getItem(KEY) || ''; },
  set api(v) { v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY); },
  get admin() { return sessionStorage.getItem(ADMIN_KEY) || ''; },
  set admin(v) { v ? sessionStorage.setItem(ADMIN_KEY, v) : sessionStorage.removeItem(ADMIN_KEY); },
};

export class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem.detail || problem.title || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.problem = problem;
  }

  // One line for people: the title, the detail, and when to retry.
  get text() {
    const p = this.problem;
    let text = p.title && p.detail && p.title !== p.detail ? `${p.title}: ${p.detail}` : this.message;
    if (p.retry_after_s) text += ` (retry in ${p.retry_after_s} s)`;
    return text;
  }
}

const listeners = new Set();
export function onUnauthorized(fn) { listeners.add(fn); }

// fetch + auth + problem handling. `as`: 'json' | 'text' | 'blob' | 'response'.
export async function api(path, { method = 'GET', body, headers = {}, admin = false, as = 'json' } = {}) {
  const key = admin ? keys.admin : keys.api;
  const all = { Accept: 'application/json, application/problem+json', ...headers };
  if (key) all.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, body, headers: all });
  } catch (err) {
    throw new ApiError(0, { title: 'The server cannot be reached', detail: `${method} ${path}: ${err.message}` });
  }
  if (!response.ok) {
    let problem;
    const type = response.headers.get('content-type') || '';
    if (type.includes('json')) {
      try { problem = await response.json(); } catch { problem = null; }
    }
    if (!problem || typeof problem !== 'object') {
      problem = { title: `HTTP ${response.status}`, detail: `${method} ${path} answered ${response.status} ${response.statusText}` };
    }
    const retry = response.headers.get('retry-after');
    if (retry && !problem.retry_after_s) problem.retry_after_s = retry;
    const error = new ApiError(response.status, problem);
    if (response.status === 401 && !admin) listeners.forEach((fn) => fn(error));
    throw error;
  }
  if (as === 'response') return response;
  if (as === 'text') return response.text();
  if (as === 'blob') return response.blob();
  if (response.status === 204) return null;
  return response.json();
}

// One image file as a multipart body under field `file`.
export function imageForm(file, fields = {}) {
  const form = new FormData();
  form.append('file', file, file.name || 'pasted.png');
  for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null && v !== '') form.append(k, v);
  return form;
}

// Text that can be saved: an object URL for a <a download>.
export function downloadURL(text, type) {
  return URL.createObjectURL(new Blob([text], { type }));
}

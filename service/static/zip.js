// Reads a zip's entries in the browser (central directory + DecompressionStream), only to show thumbnails of
// a batch job's pictures next to its results; the server does the real, checked extraction.

export async function zipEntries(file) {
  const buf = await file.arrayBuffer();
  const view = new DataView(buf);
  let eocd = -1;
  for (let i = buf.byteLength - 22; i >= Math.max(0, buf.byteLength - 65557); i -= 1) {
    if (view.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) return new Map();
  const count = view.getUint16(eocd + 10, true);
  let at = view.getUint32(eocd + 16, true);
  const entries = new Map();
  const decoder = new TextDecoder();
  for (let n = 0; n < count && at + 46 <= buf.byteLength; n += 1) {
    if (view.getUint32(at, true) !== 0x02014b50) break;
    const method = view.getUint16(at + 10, true);
    const size = view.getUint32(at + 20, true);
    const nameLen = view.getUint16(at + 28, true);
    const extraLen = view.getUint16(at + 30, true);
    const commentLen = view.getUint16(at + 32, true);
    const local = view.getUint32(at + 42, true);
    const name = decoder.decode(new Uint8Array(buf, at + 46, nameLen));
    if (!name.endsWith('/') && (method === 0 || method === 8) && !entries.has(name)) {
      entries.set(name, { method, size, local });
    }
    at += 46 + nameLen + extraLen + commentLen;
  }
  return new Map([...entries].map(([name, e]) => [name, () => readEntry(buf, view, e)]));
}

async function readEntry(buf, view, { method, size, local }) {
  const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
  const bytes = new Uint8Array(buf, start, size);
  if (method === 0) return new Blob([bytes]);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate-raw'));
  return new Response(stream).blob();
}

// quantlab reference runner: drives one JavaScript strategy (st_init / st_heartbeat / st_exit).
// Contract: SPEC.md, "Hosts, the agent and the runner". Node.js 18+, stdlib only.
// The supervisor judges health from the heartbeat file alone, so every path below keeps it honest.
import fs from 'node:fs';
import path from 'node:path';
import { format } from 'node:util';
import { pathToFileURL } from 'node:url';

const EX_CONFIG = 78; // sysexits.h: the strategy or its configuration is wrong; retrying will not help
const HOOKS = ['st_init', 'st_heartbeat', 'st_exit'];
const MAX_ERROR_TEXT = 500;

const run = { beats: 0, errorCount: 0, lastError: null, paused: process.env.QUANTLAB_PAUSED === '1',
  started: false, stopping: false, timer: null, inFlight: null };
let cfg, hooks, ctx;

// Handlers go in first: Node's defaults would kill us on SIGUSR2 and open the inspector on SIGUSR1.
process.on('SIGTERM', requestStop);
process.on('SIGINT', requestStop);
process.on('SIGUSR1', () => setPaused(true));
process.on('SIGUSR2', () => setPaused(false));
// The loop ran dry: a hook is awaiting a promise that nothing can settle. Without this, Node exits 0.
process.on('beforeExit', () => die(1, 'a strategy hook returned a promise that can never settle'));

function die(code, message) {
  process.stderr.write(`quantlab-runner: ${message}\n`);
  process.exit(code);
}

function report(what, err) {
  process.stderr.write(`quantlab-runner: ${what}: ${err instanceof Error && err.stack ? err.stack : errorText(err)}\n`);
}

function errorText(err) {
  const text = err instanceof Error ? err.message || String(err) : String(err);
  return text.slice(0, MAX_ERROR_TEXT);
}

function readConfig() {
  const env = process.env;
  const required = (name) => env[name] || die(EX_CONFIG, `${name} is not set`);
  const number = (name, fallback, ok) => {
    const value = env[name] ? Number(env[name]) : fallback;
    return ok(value) ? value : die(EX_CONFIG, `${name} is not valid: ${JSON.stringify(env[name])}`);
  };
  let params;
  try { params = JSON.parse(env.QUANTLAB_PARAMS || '{}'); } catch (err) { die(EX_CONFIG, `QUANTLAB_PARAMS is not JSON: ${err.message}`); }
  if (params === null || typeof params !== 'object' || Array.isArray(params)) die(EX_CONFIG, 'QUANTLAB_PARAMS is not a JSON object');
  return {
    id: required('QUANTLAB_STRATEGY_ID'),
    file: required('QUANTLAB_STRATEGY_FILE'),
    stateDir: required('QUANTLAB_STATE_DIR'),
    heartbeatFile: required('QUANTLAB_HEARTBEAT_FILE'),
    leaseFile: env.QUANTLAB_LEASE_FILE || null,
    heartbeatMs: number('QUANTLAB_HEARTBEAT_MS', 60000, (v) => Number.isFinite(v) && v > 0),
    epoch: number('QUANTLAB_EPOCH', 0, Number.isInteger),
    params,
    workerId: env.QUANTLAB_WORKER_ID || null,
    region: env.QUANTLAB_REGION || null,
    proxy: env.QUANTLAB_PROXY || null,
  };
}

// Write-then-rename, so a reader (the supervisor, or the next start) never sees half a file.
function writeAtomic(file, text, durable = false) {
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(tmp, 'w');
    try { fs.writeSync(fd, text); if (durable) fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}

// --- loading the strategy module ---------------------------------------------------------------

// Node treats a .js file as CommonJS or ES module from the nearest package.json, which the strategy
// author does not control on the worker. When the guess is wrong, load a copy whose extension says it.
function fallbackExtension(err) {
  if (err?.name === 'SyntaxError') return '.mjs'; // `export`/`import` in a file Node took for CommonJS
  if (err?.name === 'ReferenceError' && /\b(require|module|exports) is not defined/.test(err.message)) return '.cjs';
  return null;
}

function siblingCopy(file, ext) {
  const copy = file.slice(0, -path.extname(file).length) + ext;
  const source = fs.readFileSync(file);
  // Reuse an identical copy (another runner of the same content-addressed file made it); never a stale one.
  if (!fs.existsSync(copy) || !fs.readFileSync(copy).equals(source)) writeAtomic(copy, source);
  return copy;
}

async function importStrategy(file) {
  const ext = path.extname(file);
  const hint = ext === '.ts' ? ' (TypeScript needs a runtime that strips types: Node 22.6+ or bun)' : '';
  try {
    return await import(pathToFileURL(file).href);
  } catch (err) {
    const alt = ext === '.js' ? fallbackExtension(err) : null;
    if (!alt) die(EX_CONFIG, `cannot load ${file}: ${errorText(err)}${hint}`);
    try {
      return await import(pathToFileURL(siblingCopy(file, alt)).href);
    } catch (err2) {
      die(EX_CONFIG, `cannot load ${file}: ${errorText(err2)}`);
    }
  }
}

async function loadHooks(file) {
  const mod = await importStrategy(file);
  const found = {};
  for (const name of HOOKS) {
    // A CommonJS module.exports object arrives as `default`; bind so `this` still works in its methods.
    const owner = typeof mod[name] === 'function' ? mod : mod.default;
    if (typeof owner?.[name] !== 'function') die(EX_CONFIG, `${file} does not export ${name}`);
    found[name] = owner[name].bind(owner);
  }
  return found;
}

// --- state, lease and heartbeat files ------------------------------------------------------------

function loadState(dir) {
  const file = path.join(dir, 'state.json');
  let text;
  try { text = fs.readFileSync(file, 'utf8'); } catch { return {}; } // first start
  try {
    const state = JSON.parse(text);
    if (state && typeof state === 'object' && !Array.isArray(state)) return state;
  } catch { /* fall through */ }
  // Keep the unreadable checkpoint for a person to look at instead of overwriting it on the next save.
  const aside = `${file}.corrupt-${Date.now()}`;
  process.stderr.write(`quantlab-runner: ${file} is not a JSON object; starting empty, old copy kept as ${aside}\n`);
  try { fs.renameSync(file, aside); } catch { /* best effort */ }
  return {};
}

function saveState() {
  try {
    writeAtomic(path.join(cfg.stateDir, 'state.json'), JSON.stringify(ctx.state ?? {}), true);
  } catch (err) {
    // A checkpoint that cannot be saved is a real fault (e.g. a BigInt or a cycle in ctx.state).
    recordError('state not saved', err);
  }
}

function readLease(previous) {
  if (!cfg.leaseFile) return null;
  try {
    const { expiresAt } = JSON.parse(fs.readFileSync(cfg.leaseFile, 'utf8'));
    return typeof expiresAt === 'number' ? expiresAt : null;
  } catch (err) {
    return err.code === 'ENOENT' ? null : previous; // unreadable for a moment: keep the last known deadline
  }
}

function writeHeartbeat() {
  const { beats, errorCount, lastError, paused } = run;
  try {
    writeAtomic(cfg.heartbeatFile, JSON.stringify({ t: Date.now(), beats, errorCount, lastError, paused }));
  } catch (err) {
    report('cannot write the heartbeat file', err); // the file goes stale and the supervisor acts on it
  }
}

function recordError(what, err) {
  run.errorCount += 1;
  run.lastError = errorText(err);
  report(what, err);
}

// --- lifecycle -----------------------------------------------------------------------------------

function setPaused(paused) {
  if (run.stopping) return;
  run.paused = paused;
  if (run.started) writeHeartbeat(); // show the change at once; before init ends there is no file yet
}

function scheduleTick() {
  run.timer = setTimeout(tick, cfg.heartbeatMs); // after the previous beat finished: beats never overlap
}

async function tick() {
  if (run.stopping) return;
  ctx.leaseExpiresAt = readLease(ctx.leaseExpiresAt);
  if (ctx.leaseExpiresAt !== null && Date.now() > ctx.leaseExpiresAt) {
    // The supervisor fences first; this covers a runner whose supervisor is gone (killed, OOM).
    process.stderr.write('quantlab-runner: lease expired and nobody stopped us: stopping\n');
    requestStop();
    return;
  }
  if (run.paused) {
    writeHeartbeat(); // keep the file fresh so a paused strategy does not look dead
  } else {
    run.inFlight = beat();
    await run.inFlight;
    run.inFlight = null;
  }
  if (!run.stopping) scheduleTick();
}

async function beat() {
  try {
    await hooks.st_heartbeat(ctx);
    run.beats += 1;
  } catch (err) {
    recordError('st_heartbeat failed', err);
  }
  saveState(); // also after a throw: whatever the strategy recorded before it failed did happen
  writeHeartbeat();
}

function requestStop() {
  if (run.stopping) return; // a second signal must not run st_exit twice
  run.stopping = true;
  clearTimeout(run.timer);
  if (run.started) shutdown(); // otherwise main() notices once loading or st_init is over
}

async function shutdown() {
  await run.inFlight; // let a running beat finish: st_exit must not overlap it
  ctx.leaseExpiresAt = readLease(ctx.leaseExpiresAt);
  try { await hooks.st_exit(ctx); } catch (err) { report('st_exit failed', err); }
  saveState();
  process.exit(0);
}

async function main() {
  cfg = readConfig();
  fs.rmSync(cfg.heartbeatFile, { force: true }); // a file left by an earlier run must not pass for ours
  hooks = await loadHooks(cfg.file);
  if (run.stopping) process.exit(0); // stopped before the strategy ran at all: nothing to clean up
  const { id, params, workerId, region, proxy, epoch } = cfg;
  ctx = { id, params, workerId, region, proxy, epoch, leaseExpiresAt: readLease(null), state: loadState(cfg.stateDir),
    // One line per call, so a log collector never splits one message into several.
    log: (...args) => process.stdout.write(`${new Date().toISOString()} ${format(...args).replace(/\r?\n/g, '\\n')}\n`) };
  try {
    await hooks.st_init(ctx);
  } catch (err) {
    report('st_init failed', err);
    process.exit(1);
  }
  saveState();
  run.started = true;
  writeHeartbeat(); // beats: 0 tells the supervisor that st_init finished
  if (run.stopping) return shutdown(); // SIGTERM arrived during st_init
  scheduleTick();
}

main().catch((err) => { report('runner failed', err); process.exit(1); });

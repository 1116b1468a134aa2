// quantlab reference runner: drives one JavaScript strategy (st_init / st_heartbeat / st_exit).
// Contract: SPEC.md, "Hosts, the agent and the runner". Node.js 18+, stdlib only.
// The supervisor judges health from the heartbeat file alone, so every path below keeps it honest.
// The same file runs twice: as the runner on the main thread, and as its watchdog in a worker thread.
import fs from 'node:fs';
import path from 'node:path';
import { format } from 'node:util';
import { pathToFileURL } from 'node:url';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

const EX_CONFIG = 78; // sysexits.h: the strategy or its configuration is wrong; retrying will not help
const HOOKS = ['st_init', 'st_heartbeat', 'st_exit'];
const MAX_ERROR_TEXT = 500;
const LEASE_MAX_BYTES = 4096;
const WATCHDOG_POLL_MS = 200;
const LOG_PATIENCE_MS = 100; // how long the watchdog lets a stderr write hold up a stop or a kill

const run = { beats: 0, errorCount: 0, lastError: null, paused: process.env.QUANTLAB_PAUSED === '1',
  started: false, stopping: false, timer: null, inFlight: null, lease: null, leaseExpiresAt: null, watchdog: null,
  nextState: null, saving: null };
let cfg, hooks, ctx;

if (isMainThread) {
  // Handlers go in first: Node's defaults would kill us on SIGUSR2 and open the inspector on SIGUSR1.
  process.on('SIGTERM', requestStop);
  process.on('SIGINT', requestStop);
  process.on('SIGUSR1', () => setPaused(true));
  process.on('SIGUSR2', () => setPaused(false));
  // The loop ran dry: a hook is awaiting a promise that nothing can settle. Without this, Node exits 0.
  process.on('beforeExit', () => die(1, 'a strategy hook returned a promise that can never settle'));
}

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
    stopTimeoutMs: number('QUANTLAB_STOP_TIMEOUT_MS', 10000, (v) => Number.isFinite(v) && v > 0),
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

// --- state and heartbeat files ------------------------------------------------------------------

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

// After a beat the checkpoint is made durable off the beat: an fsync on a busy disk can take seconds,
// and the heartbeat must say whether the strategy is alive, not how fast the disk is. Saves coalesce:
// one write at a time, and the next one takes the newest state.
function saveStateInBackground() {
  let text;
  try {
    text = JSON.stringify(ctx.state ?? {});
  } catch (err) {
    recordError('state not saved', err); // a BigInt or a cycle: this beat's fault, reported with it
    return;
  }
  run.nextState = text;
  if (!run.saving) run.saving = flushState();
}

async function flushState() {
  while (run.nextState !== null) {
    const text = run.nextState;
    run.nextState = null;
    try {
      await writeAtomicDurable(path.join(cfg.stateDir, 'state.json'), text);
    } catch (err) {
      recordError('state not saved', err);
    }
  }
  run.saving = null; // in the same turn as the loop's last look: no save can slip in between
}

async function writeAtomicDurable(file, text) {
  const tmp = `${file}.tmp-${process.pid}-bg`; // never the name the synchronous save uses
  try {
    const handle = await fs.promises.open(tmp, 'w');
    try { await handle.writeFile(text); await handle.sync(); } finally { await handle.close(); }
    await fs.promises.rename(tmp, file);
  } catch (err) {
    await fs.promises.rm(tmp, { force: true });
    throw err;
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
  // Checked here too, synchronously: after the host was frozen (a paused VM resumed), this timer may
  // fire before the watchdog had a chance to look, and a beat past the lease is a second copy trading.
  if (leaseExpired(run.lease)) {
    process.stderr.write('quantlab-runner: lease expired before this heartbeat: stopping without it\n');
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
  saveStateInBackground(); // also after a throw: whatever the strategy recorded before it failed did happen
  writeHeartbeat();
}

// One way to stop, whatever asked for it: SIGTERM, SIGINT, or the watchdog (lease, parent gone).
function requestStop() {
  if (run.stopping) return; // a second signal must not run st_exit twice
  run.stopping = true;
  clearTimeout(run.timer);
  run.watchdog?.postMessage({ type: 'stopping' }); // from now on it kills us once the grace is over
  if (run.started) shutdown(); // otherwise main() notices once loading or st_init is over
}

// The lease ended longer ago than the stop timeout (the host was frozen, say): the controller may have
// started a replacement by now, and an st_exit that cancels orders would hit that copy's.
function leaseLongGone() {
  const now = bootSeconds();
  return run.lease?.deadline != null && now !== null && now > run.lease.deadline + cfg.stopTimeoutMs / 1000;
}

async function shutdown() {
  if (leaseLongGone()) {
    process.stderr.write('quantlab-runner: the lease ended more than the stop timeout ago: exiting without st_exit (a replacement may already trade)\n');
    process.exit(0);
  }
  await settleBeat(cfg.stopTimeoutMs / 2);
  try { await hooks.st_exit(ctx); } catch (err) { report('st_exit failed', err); }
  await run.saving; // an older background save must not land after the last one
  saveState();
  process.exit(0);
}

// st_exit must not overlap a running beat, but a beat that never returns must not cost us st_exit:
// wait for it at most `patience` ms, which leaves st_exit the rest of the grace.
async function settleBeat(patience) {
  if (!run.inFlight) return;
  let timer;
  const gaveUp = new Promise((resolve) => { timer = setTimeout(resolve, patience, 'gave up'); });
  const outcome = await Promise.race([run.inFlight, gaveUp]);
  clearTimeout(timer);
  if (outcome === 'gave up') {
    process.stderr.write(`quantlab-runner: st_heartbeat still running after ${patience} ms: calling st_exit anyway\n`);
  }
}

async function main() {
  cfg = readConfig();
  fs.rmSync(cfg.heartbeatFile, { force: true }); // a file left by an earlier run must not pass for ours
  // The lease in the file at start holds from the first moment, also while the strategy loads.
  const lease = cfg.leaseFile ? readLeaseFile(cfg.leaseFile, cfg.epoch) : null;
  run.lease = lease;
  run.leaseExpiresAt = lease?.expiresAt ?? null;
  run.watchdog = startWatchdog(lease);
  hooks = await loadHooks(cfg.file);
  if (run.stopping) process.exit(0); // stopped before the strategy ran at all: nothing to clean up
  const { id, params, workerId, region, proxy, epoch } = cfg;
  ctx = { id, params, workerId, region, proxy, epoch, leaseExpiresAt: run.leaseExpiresAt, state: loadState(cfg.stateDir),
    // One line per call, so a log collector never splits one message into several.
    log: (...args) => process.stdout.write(`${new Date().toISOString()} ${format(...args).replace(/\r?\n/g, '\\n')}\n`) };
  // Fail closed, synchronously: the watchdog's first look may come after st_init (its thread starts
  // slower than a small module loads), and a strategy whose lease ran out must not even initialise.
  if (leaseExpired(run.lease)) die(0, 'lease expired before st_init: not starting the strategy');
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

// --- the lease ------------------------------------------------------------------------------------
// The agent writes {"epoch", "deadline", "expiresAt"}: `deadline` is seconds on the host's boot-time
// clock and is what fences; `expiresAt` is the same moment in wall-clock ms, for ctx.leaseExpiresAt.

// A lease {deadline, expiresAt} for our epoch, or null when the file tells us nothing (missing for a
// moment, unreadable, not a regular file, too big, another epoch's, or no lease at all).
function readLeaseFile(file, epoch) {
  let lease;
  try { lease = JSON.parse(readSmallRegularFile(file, LEASE_MAX_BYTES)); } catch { return null; }
  if (lease?.epoch !== epoch) return null; // another placement's lease says nothing about ours
  const deadline = finiteOrNull(lease.deadline);
  const expiresAt = finiteOrNull(lease.expiresAt);
  return deadline === null && expiresAt === null ? null : { deadline, expiresAt };
}

function readSmallRegularFile(file, maxBytes) {
  const { O_RDONLY, O_NOFOLLOW = 0, O_NONBLOCK = 0 } = fs.constants;
  const fd = fs.openSync(file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK); // a FIFO in its place must not block us
  try {
    if (!fs.fstatSync(fd).isFile()) throw new Error(`${file} is not a regular file`);
    const buffer = Buffer.alloc(maxBytes + 1);
    const length = fs.readSync(fd, buffer, 0, buffer.length, 0);
    if (length > maxBytes) throw new Error(`${file} is larger than ${maxBytes} bytes`);
    return buffer.toString('utf8', 0, length);
  } finally {
    fs.closeSync(fd);
  }
}

function finiteOrNull(value) {
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

// A lease only ever moves forward: whichever of the two ends later (fail closed on anything else).
function laterLease(known, seen) {
  if (!seen) return known;
  if (!known) return seen;
  // Once a boot-time deadline is known, only a later one moves it: the wall clock can never extend it.
  if (known.deadline !== null) return seen.deadline !== null && seen.deadline > known.deadline ? seen : known;
  if (seen.deadline !== null) return seen;
  return seen.expiresAt > known.expiresAt ? seen : known; // neither has a deadline, so both have expiresAt
}

function leaseExpired(lease) {
  if (!lease) return false; // no lease: fencing is off
  const now = bootSeconds();
  if (lease.deadline !== null && now !== null) return now > lease.deadline;
  return lease.expiresAt !== null && Date.now() > lease.expiresAt; // no boot-time clock here: the wall clock
}

// Linux CLOCK_BOOTTIME, the clock the agent writes deadlines on: it never jumps and counts through suspend.
function bootSeconds() {
  try {
    const seconds = Number(fs.readFileSync('/proc/uptime', 'utf8').split(' ')[0]);
    return Number.isFinite(seconds) ? seconds : null;
  } catch {
    return null;
  }
}

// The kernel's answer, in case process.ppid is cached in a worker thread by some Node version.
function currentParentPid() {
  let ppid;
  try {
    const stat = fs.readFileSync('/proc/self/stat', 'utf8');
    ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]); // "pid (comm) state ppid ..."
  } catch { /* no /proc here */ }
  return Number.isInteger(ppid) ? ppid : process.ppid;
}

// --- the watchdog ---------------------------------------------------------------------------------
// A worker thread that enforces the lease and watches the parent even while a hook blocks the main
// thread (a busy loop) or never returns. It asks the main thread to stop (so st_exit runs if it can)
// and kills the whole process once a stop has taken longer than QUANTLAB_STOP_TIMEOUT_MS.

function startWatchdog(lease) {
  const { leaseFile, epoch, stopTimeoutMs } = cfg;
  const watchdog = new Worker(new URL(import.meta.url), {
    workerData: { leaseFile, epoch, lease, stopTimeoutMs, parentPid: currentParentPid() },
  });
  watchdog.on('message', onWatchdogMessage);
  watchdog.on('error', (err) => { report('the lease watchdog failed', err); requestStop(); }); // fail closed
  watchdog.unref(); // it must never be what keeps the process alive (after .on, which would ref it again)
  return watchdog;
}

function onWatchdogMessage(message) {
  if (message.type === 'lease') {
    run.lease = message.lease;
    run.leaseExpiresAt = message.lease.expiresAt;
    if (ctx) ctx.leaseExpiresAt = message.lease.expiresAt;
  } else if (message.type === 'stop') {
    requestStop();
  }
}

class Watchdog {
  constructor({ leaseFile, epoch, lease, stopTimeoutMs, parentPid }) {
    Object.assign(this, { leaseFile, epoch, lease, stopTimeoutMs, parentPid });
    this.stopping = false;
  }

  start() {
    parentPort.on('message', (message) => { if (message.type === 'stopping') this.armKill(); });
    setInterval(() => this.poll(), WATCHDOG_POLL_MS);
    this.poll();
  }

  poll() {
    if (this.stopping) return; // only the kill timer matters now
    this.refreshLease();
    const reason = this.reasonToStop();
    if (reason) this.stop(`${reason}: stopping (st_exit gets ${this.stopTimeoutMs} ms)`);
  }

  reasonToStop() {
    if (leaseExpired(this.lease)) return 'lease expired and nobody stopped us';
    if (currentParentPid() !== this.parentPid) return `parent process ${this.parentPid} is gone`;
    return null;
  }

  refreshLease() {
    if (!this.leaseFile) return;
    // Expired stays expired: a renewal first seen after the known deadline passed (this process was
    // frozen, or the renewal came late) may come after the controller started a replacement.
    if (leaseExpired(this.lease)) return;
    const later = laterLease(this.lease, readLeaseFile(this.leaseFile, this.epoch));
    if (later === this.lease) return;
    this.lease = later;
    parentPort.postMessage({ type: 'lease', lease: later }); // keeps ctx.leaseExpiresAt (and tick's check) current
  }

  stop(reason) {
    this.armKill();
    logThen(reason, () => parentPort.postMessage({ type: 'stop' }));
  }

  armKill() {
    if (this.stopping) return;
    this.stopping = true;
    const kill = () => killProcessGroup();
    setTimeout(() => logThen(`still running ${this.stopTimeoutMs} ms after the stop began: killing`, kill),
      this.stopTimeoutMs);
  }
}

// The whole process, not just this thread, and what it started in its group (the supervisor makes
// the runner a group leader; where it is not one, only the process).
function killProcessGroup() {
  try { process.kill(-process.pid, 'SIGKILL'); } catch { /* not a group leader */ }
  process.kill(process.pid, 'SIGKILL');
}

// Write one line to stderr, then act. The write goes straight to fd 2 (a worker's process.stderr is
// relayed by the main thread, which may be blocked), and off this thread: stderr may be a full pipe
// that nobody reads (a frozen supervisor), so the action never waits for it longer than a moment.
function logThen(message, action) {
  let done = false;
  const once = () => { if (!done) { done = true; action(); } };
  setTimeout(once, LOG_PATIENCE_MS);
  fs.write(2, `quantlab-runner: ${message}\n`, once);
}

if (isMainThread) {
  main().catch((err) => { report('runner failed', err); process.exit(1); });
} else {
  new Watchdog(workerData).start();
}

// Martingale strategy — PAPER TRADING ONLY. CommonJS module (module.exports).
// No network, no exchange: prices come from a seeded random walk kept in ctx.state, so a restart
// continues the same simulation. Goes long baseQty; closes at +1% (win) or -1% (loss). After a loss
// the next size is multiplied by `multiplier`, up to `maxSteps` times in a row; a win (or reaching
// maxSteps) resets the size to baseQty.
// Params: {symbol, account, baseQty = 0.01, multiplier = 2, maxSteps = 5}
'use strict';

const TAKE_PROFIT = 0.01;
const STOP_LOSS = 0.01;

// Deterministic PRNG (mulberry32); its seed lives in ctx.state so the walk survives restarts.
function nextRandom(state) {
  let t = (state.seed = (state.seed + 0x6d2b79f5) >>> 0);
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

function seedFrom(text) {
  let h = 2166136261;
  for (const ch of String(text)) h = Math.imul(h ^ ch.charCodeAt(0), 16777619) >>> 0;
  return h;
}

function settings(params) {
  const s = { baseQty: 0.01, multiplier: 2, maxSteps: 5, ...params };
  if (!s.symbol) throw new Error('params.symbol is required');
  if (!(s.baseQty > 0)) throw new Error('params.baseQty must be positive');
  if (!(s.multiplier >= 1)) throw new Error('params.multiplier must be at least 1');
  if (!(Number.isInteger(s.maxSteps) && s.maxSteps >= 0)) throw new Error('params.maxSteps must be a whole number');
  return s;
}

const round = (x, digits = 6) => Number(x.toFixed(digits));

function st_init(ctx) {
  const p = settings(ctx.params);
  const s = ctx.state;
  if (s.price === undefined) {
    Object.assign(s, { ticks: 0, seed: seedFrom(p.symbol), price: 50, step: 0, qty: 0, entry: null,
      realizedPnl: 0, wins: 0, losses: 0 });
  }
  ctx.log(`[${ctx.id}] martingale ${p.symbol} on ${p.account || '-'} (paper) epoch ${ctx.epoch};`,
    `tick ${s.ticks}, step ${s.step}, ${s.qty > 0 ? `long ${round(s.qty)} @ ${s.entry}` : 'flat'}`);
}

function st_heartbeat(ctx) {
  const p = settings(ctx.params);
  const s = ctx.state;
  s.ticks = (s.ticks ?? 0) + 1;
  s.price = round(s.price * (1 + (nextRandom(s) - 0.5) * 0.008), 4);

  let action = 'hold';
  if (s.qty === 0) {
    s.qty = p.baseQty * p.multiplier ** s.step;
    s.entry = s.price;
    action = `buy ${round(s.qty)}`;
  } else {
    const change = s.price / s.entry - 1;
    if (change >= TAKE_PROFIT || change <= -STOP_LOSS) {
      const pnl = s.qty * (s.price - s.entry);
      s.realizedPnl += pnl;
      if (pnl > 0) { s.wins += 1; s.step = 0; } else { s.losses += 1; s.step = s.step >= p.maxSteps ? 0 : s.step + 1; }
      action = `close ${round(s.qty)} (${pnl > 0 ? 'win' : 'loss'} ${round(pnl, 4)})`;
      s.qty = 0;
      s.entry = null;
    }
  }
  ctx.log(`[${ctx.id}] #${s.ticks} ${p.symbol} ${round(s.price, 2)} ${action}; step ${s.step} pnl ${round(s.realizedPnl, 4)}`);
}

function st_exit(ctx) {
  const s = ctx.state;
  ctx.log(`[${ctx.id}] martingale stopping (paper): ${s.qty > 0 ? `long ${round(s.qty)} @ ${s.entry}` : 'flat'},`,
    `realized pnl ${round(s.realizedPnl || 0, 4)}, ${s.wins || 0} wins / ${s.losses || 0} losses`);
}

module.exports = { st_init, st_heartbeat, st_exit };

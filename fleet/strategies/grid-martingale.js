// Grid strategy with martingale sizing — PAPER TRADING ONLY.
// No network, no exchange: prices come from a seeded random walk kept in ctx.state, so a restart
// (or a move to another worker, which carries the checkpoint) continues the same simulation.
// Buys one grid step lower each time the price falls through a level, doubling the size per level
// below the anchor (martingale); sells the whole position one grid step above the average price.
// Params: {symbol, account, exchange = bybit (binance, okx), gridCount = 10, gridSpacing = 0.005
// (fraction of price), baseQty = 0.001}

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
  const s = { gridCount: 10, gridSpacing: 0.005, baseQty: 0.001, ...params };
  if (!s.symbol) throw new Error('params.symbol is required');
  if (!(Number.isInteger(s.gridCount) && s.gridCount > 0)) throw new Error('params.gridCount must be a positive integer');
  if (!(s.gridSpacing > 0 && s.gridSpacing < 1)) throw new Error('params.gridSpacing must be a fraction between 0 and 1');
  if (!(s.baseQty > 0)) throw new Error('params.baseQty must be positive');
  return s;
}

const round = (x, digits = 6) => Number(x.toFixed(digits));

// Belt and braces for fencing: ask the exchange itself to cancel this account's open orders a little
// after ctx.leaseExpiresAt, and re-arm it on every heartbeat. A copy cut off by a partition (frozen,
// or unable to reach anything) then has its orders cancelled by the exchange as well. Each exchange
// bounds the window (seconds): Bybit 10..300, OKX 10..120; Binance takes milliseconds.
// PAPER: logs the request it would send instead of sending it.
const DEAD_MANS_SWITCH = {
  binance: (symbol, ms) => `POST /fapi/v1/countdownCancelAll symbol=${symbol} countdownTime=${ms}`,
  bybit: (symbol, ms) => `POST /v5/order/disconnected-cancel-all timeWindow=${clamp(Math.ceil(ms / 1000), 10, 300)}`,
  okx: (symbol, ms) => `POST /api/v5/trade/cancel-all-after timeOut=${clamp(Math.ceil(ms / 1000), 10, 120)}`,
};
const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

function armDeadMansSwitch(ctx, p) {
  if (ctx.leaseExpiresAt == null) return; // fencing is off: nothing to arm against
  const ms = Math.max(0, ctx.leaseExpiresAt - Date.now()) + 5000; // the lease, plus st_exit's head start
  const request = (DEAD_MANS_SWITCH[p.exchange] ?? DEAD_MANS_SWITCH.bybit)(p.symbol, ms);
  ctx.log(`[${ctx.id}] dead man's switch (paper, not sent): ${request}`);
}

export function st_init(ctx) {
  const p = settings(ctx.params);
  const s = ctx.state;
  if (s.price === undefined) {
    // First start ever: anchor the grid at the simulated opening price.
    Object.assign(s, { ticks: 0, seed: seedFrom(p.symbol), price: 100, anchor: 100, level: 0,
      position: 0, cost: 0, realizedPnl: 0, trades: 0 });
  }
  ctx.log(`[${ctx.id}] grid-martingale ${p.symbol} on ${p.account ?? '-'} (paper) epoch ${ctx.epoch};`,
    `tick ${s.ticks}, price ${round(s.price, 2)}, position ${round(s.position)}`);
  // Reconcile with the exchange before trading: even a fresh checkpoint can be stale (a fill while
  // the last copy was being fenced, an order it placed just before it stopped). A live strategy
  // fetches its open orders and position here and trusts them over ctx.state. PAPER: the simulation
  // is the exchange, so the checkpoint is the truth.
  ctx.log(`[${ctx.id}] reconcile (paper): a live strategy fetches open orders and the ${p.symbol} position`,
    `on ${p.account ?? '-'} here and trusts them over the checkpoint`);
  armDeadMansSwitch(ctx, p);
}

export function st_heartbeat(ctx) {
  const p = settings(ctx.params);
  const s = ctx.state;
  s.ticks = (s.ticks ?? 0) + 1;
  s.price = round(s.price * (1 + (nextRandom(s) - 0.5) * 2 * p.gridSpacing), 4);

  // Which grid level is the price at now? Level k (k >= 1) is k spacings below the anchor.
  const level = Math.min(p.gridCount, Math.max(0, Math.floor((s.anchor - s.price) / (s.anchor * p.gridSpacing))));
  let action = 'hold';
  if (level > s.level) {
    // Fell through one or more levels: buy at each, doubling the size per level (martingale).
    for (let k = s.level + 1; k <= level; k++) {
      const qty = p.baseQty * 2 ** (k - 1);
      s.position += qty;
      s.cost += qty * s.price;
      s.trades += 1;
    }
    action = `buy to level ${level}`;
    s.level = level;
  } else if (s.position > 0 && s.price >= (s.cost / s.position) * (1 + p.gridSpacing)) {
    // One step above the average entry: take the profit, re-anchor the grid here.
    s.realizedPnl += s.position * s.price - s.cost;
    s.trades += 1;
    action = `sell ${round(s.position)}`;
    Object.assign(s, { position: 0, cost: 0, level: 0, anchor: s.price });
  } else if (s.position === 0 && s.price > s.anchor) {
    s.anchor = s.price; // follow the market up while flat, so the grid stays near the price
  }

  armDeadMansSwitch(ctx, p);
  const unrealized = s.position * s.price - s.cost;
  ctx.log(`[${ctx.id}] #${s.ticks} ${p.symbol} ${round(s.price, 2)} ${action}; pos ${round(s.position)} level ${s.level}`,
    `pnl ${round(s.realizedPnl, 4)} (+${round(unrealized, 4)} open)`);
}

export function st_exit(ctx) {
  const s = ctx.state;
  ctx.log(`[${ctx.id}] grid-martingale stopping (paper): price ${round(s.price ?? 0, 2)} position ${round(s.position ?? 0)}`,
    `realized pnl ${round(s.realizedPnl ?? 0, 4)} after ${s.trades ?? 0} trades`);
}

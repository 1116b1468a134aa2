// Moving-average crossover trend follower — PAPER TRADING ONLY.
// No network, no exchange: prices come from a seeded random walk kept in ctx.state, so a restart
// continues the same simulation with the same price history. Long `qty` while the fast average is
// above the slow one, flat otherwise.
// Params: {symbol, account, fast = 5, slow = 20, qty = 1}

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
  const s = { fast: 5, slow: 20, qty: 1, ...params };
  if (!s.symbol) throw new Error('params.symbol is required');
  if (!(Number.isInteger(s.fast) && Number.isInteger(s.slow) && s.fast >= 1 && s.fast < s.slow)) {
    throw new Error('params.fast and params.slow must be whole numbers with 1 <= fast < slow');
  }
  if (!(s.qty > 0)) throw new Error('params.qty must be positive');
  return s;
}

const round = (x, digits = 4) => Number(x.toFixed(digits));
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

export async function st_init(ctx) {
  const p = settings(ctx.params);
  const s = ctx.state;
  if (s.prices === undefined) {
    Object.assign(s, { ticks: 0, seed: seedFrom(p.symbol), prices: [2000], position: 0, entry: null, realizedPnl: 0, trades: 0 });
  }
  ctx.log(`[${ctx.id}] trend ${p.symbol} on ${p.account ?? '-'} (paper) epoch ${ctx.epoch}; MA ${p.fast}/${p.slow},`,
    `tick ${s.ticks}, ${s.prices.length} prices of history, ${s.position > 0 ? `long @ ${s.entry}` : 'flat'}`);
}

export async function st_heartbeat(ctx) {
  const p = settings(ctx.params);
  const s = ctx.state;
  s.ticks = (s.ticks ?? 0) + 1;
  const last = s.prices[s.prices.length - 1];
  const price = round(last * (1 + (nextRandom(s) - 0.49) * 0.01)); // a slight upward drift
  s.prices = [...s.prices, price].slice(-p.slow); // only the window the slow average needs

  let signal = 'warming up';
  if (s.prices.length >= p.slow) {
    const fast = mean(s.prices.slice(-p.fast));
    const slow = mean(s.prices);
    signal = `fast ${round(fast, 2)} ${fast > slow ? '>' : '<='} slow ${round(slow, 2)}`;
    if (fast > slow && s.position === 0) {
      Object.assign(s, { position: p.qty, entry: price, trades: s.trades + 1 });
      signal += `, buy ${p.qty}`;
    } else if (fast <= slow && s.position > 0) {
      s.realizedPnl = round(s.realizedPnl + s.position * (price - s.entry));
      Object.assign(s, { position: 0, entry: null, trades: s.trades + 1 });
      signal += ', sell';
    }
  }
  ctx.log(`[${ctx.id}] #${s.ticks} ${p.symbol} ${price} ${signal}; pos ${s.position} pnl ${s.realizedPnl}`);
}

export async function st_exit(ctx) {
  const s = ctx.state;
  ctx.log(`[${ctx.id}] trend stopping (paper): ${s.position > 0 ? `long ${s.position} @ ${s.entry}` : 'flat'},`,
    `realized pnl ${s.realizedPnl ?? 0} after ${s.trades ?? 0} trades`);
}

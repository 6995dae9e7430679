/**
 * Verifications per second of server/verify-agent-token.ts, end to end: form,
 * checksum, one indexed lookup in PostgreSQL, one argon2 verification. Run by
 * bench/server_throughput.py, which makes the database and the tokens:
 *
 *   DATABASE_URL=... tsx bench/server-throughput.mts TOKEN_FILE SECONDS CONCURRENCY
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { verifyAgentToken } from "../server/verify-agent-token.ts";

const require = createRequire(new URL("../server/package.json", import.meta.url));
const pg = require("pg");

const [tokenFile, seconds, concurrency] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const tokens = readFileSync(tokenFile, "utf8").split("\n").filter(Boolean);
const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: concurrency });

const latencies: number[] = [];
let invalid = 0;
const deadline = performance.now() + seconds * 1000;

async function worker(offset: number): Promise<void> {
  for (let i = offset; performance.now() < deadline; i += concurrency) {
    const started = performance.now();
    const verdict = await verifyAgentToken(pool, tokens[i % tokens.length]);
    latencies.push(performance.now() - started);
    if (!verdict.valid) invalid++;
  }
}

await verifyAgentToken(pool, tokens[0]); // warm: connect, load argon2
const started = performance.now();
await Promise.all(Array.from({ length: concurrency }, (_, offset) => worker(offset)));
const elapsed = (performance.now() - started) / 1000;
await pool.end();
latencies.sort((a, b) => a - b);
console.log(JSON.stringify({
  verifications: latencies.length,
  perSecond: latencies.length / elapsed,
  medianMs: latencies[Math.floor(latencies.length / 2)],
  p99Ms: latencies[Math.floor(latencies.length * 0.99)],
  invalid,
}));

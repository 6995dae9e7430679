/**
 * How the Kan server checks an agent token: the algorithm of docs/tokens.md.
 *
 * verifyAgentToken() is what a request handler calls with the bearer token;
 * with { stamp: true } it also stamps a valid token's "lastUsedAt" (or call
 * stampLastUsed() yourself once the request is accepted). Both go through the
 * two functions `agent-identity schema` made for the server, by their
 * schema-qualified names: the server needs no grant on any table, and no table
 * a session plants (a temporary agent_token, handed on by a pooler) can answer
 * in their place. The schema is AGENT_IDENTITY_DB_SCHEMA's (default public).
 * Run as a script, it reads tokens from standard input, one per line, prints
 * one JSON verdict per line (the tests compare these with
 * `agent-identity verify`) and stamps the valid ones, as a server would:
 *
 *   DATABASE_URL=postgres://... npx tsx verify-agent-token.ts < token-file
 */
import { pathToFileURL } from "node:url";
import { crc32 } from "node:zlib"; // Node >= 20.15
import argon2 from "argon2";
import pg from "pg";

export type Reason =
  | "malformed"
  | "bad_checksum"
  | "unknown_token"
  | "hash_mismatch"
  | "token_revoked"
  | "token_expired"
  | "identity_paused"
  | "identity_revoked"
  | "workspace_deleted";

export type Verdict =
  | { valid: true; tokenPublicId: string; identityPublicId: string; workspaceId: string; scopes: string[] }
  | { valid: false; reason: Reason };

// kan_agent_<12 base62 public id>_<43+ base62 secret><6 base62 CRC32>
const TOKEN = /^kan_agent_([0-9A-Za-z]{12})_[0-9A-Za-z]{43,}([0-9A-Za-z]{6})$/;
const BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

function base62(value: number, width: number): string {
  let digits = "";
  for (let rest = value; rest > 0; rest = Math.floor(rest / 62)) digits = BASE62[rest % 62] + digits;
  return digits.padStart(width, "0");
}

/** The schema that holds Kan's and the agent tables, quoted: a plain identifier only. */
export function schemaIdentifier(name: string = process.env.AGENT_IDENTITY_DB_SCHEMA || "public"): string {
  if (!/^(?!pg_)(?!information_schema$)[A-Za-z_][A-Za-z0-9_]{0,62}$/i.test(name)) {
    throw new Error(`AGENT_IDENTITY_DB_SCHEMA: ${JSON.stringify(name.slice(0, 80))} is not a schema name`);
  }
  return `"${name.replaceAll('"', '""')}"`;
}

// One call, its name qualified and its argument's type named in full (a session's
// temporary type named text comes before pg_catalog's), so that no look-alike on the
// search_path (a temporary table, an overload, a type) is what answers.
// Expiry is judged in SQL by the database's clock: the columns are UTC `timestamp`
// without a zone, which node-postgres would read as local time.
const lookup = (schema: string) => `SELECT * FROM ${schema}.agent_token_for_verification($1::pg_catalog.text)`;
const stamp = (schema: string) => `SELECT ${schema}.agent_token_stamp($1::pg_catalog.text) AS stamped`;

interface Row {
  tokenHash: string;
  scopes: string[];
  revoked: boolean;
  expired: boolean;
  identityPublicId: string;
  status: "active" | "paused" | "revoked";
  workspaceId: string;
  workspaceDeleted: boolean;
}

export interface VerifyOptions {
  /** Stamp "lastUsedAt" of a token found valid (stampLastUsed). */
  stamp?: boolean;
  /** The schema's name, if not AGENT_IDENTITY_DB_SCHEMA's. */
  schema?: string;
}

export async function verifyAgentToken(
  db: pg.Pool | pg.Client,
  token: string,
  options: VerifyOptions = {},
): Promise<Verdict> {
  // 1-2. Form and checksum: refuse look-alikes and typos with no database or argon2 work.
  const match = TOKEN.exec(token);
  if (!match) return { valid: false, reason: "malformed" };
  const [, publicId, checksum] = match;
  if (base62(crc32(token.slice(0, -6)), 6) !== checksum) return { valid: false, reason: "bad_checksum" };

  // 3. One indexed lookup by the token's public id.
  const schema = schemaIdentifier(options.schema);
  const { rows } = await db.query<Row>(lookup(schema), [publicId]);
  const row = rows[0];
  if (!row) return { valid: false, reason: "unknown_token" };

  // 4. Exactly one argon2 verification, of the whole token string.
  if (!(await argon2.verify(row.tokenHash, token))) return { valid: false, reason: "hash_mismatch" };

  // 5-7. The token, then its identity, then its workspace.
  if (row.revoked) return { valid: false, reason: "token_revoked" };
  if (row.expired) return { valid: false, reason: "token_expired" };
  if (row.status === "paused") return { valid: false, reason: "identity_paused" };
  if (row.status !== "active") return { valid: false, reason: "identity_revoked" };
  if (row.workspaceDeleted) return { valid: false, reason: "workspace_deleted" };

  // 8. The caller allows only what row.scopes grants (see allows()).
  if (options.stamp) await stampLastUsed(db, publicId, options.schema);
  return {
    valid: true,
    tokenPublicId: publicId,
    identityPublicId: row.identityPublicId,
    workspaceId: row.workspaceId,
    scopes: row.scopes,
  };
}

/** Stamp a token's "lastUsedAt" with the database's time; false if there is no such token. */
export async function stampLastUsed(db: pg.Pool | pg.Client, tokenPublicId: string, schema?: string): Promise<boolean> {
  const { rows } = await db.query<{ stamped: boolean | null }>(stamp(schemaIdentifier(schema)), [tokenPublicId]);
  return rows[0]?.stamped === true;
}

export function allows(verdict: Verdict, scope: string): boolean {
  return verdict.valid && verdict.scopes.includes(scope);
}

async function main(): Promise<void> {
  let input = "";
  for await (const chunk of process.stdin) input += chunk;
  const db = new pg.Client(process.env.DATABASE_URL ? { connectionString: process.env.DATABASE_URL } : {});
  await db.connect();
  try {
    for (const line of input.split("\n")) {
      if (line.trim()) {
        process.stdout.write(JSON.stringify(await verifyAgentToken(db, line.trim(), { stamp: true })) + "\n");
      }
    }
  } finally {
    await db.end();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((error: unknown) => {
    console.error(`verify-agent-token: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = 1;
  });
}

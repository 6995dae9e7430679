/**
 * How the Kan server checks an agent token: the algorithm of docs/tokens.md.
 *
 * verifyAgentToken() is what a request handler calls with the bearer token.
 * Run as a script, it reads tokens from standard input, one per line, and
 * prints one JSON verdict per line (the tests compare these with
 * `agent-identity verify`):
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

// Expiry is judged by the database's clock: the columns are UTC `timestamp`
// without a zone, which node-postgres would read as local time.
const LOOKUP = `
  SELECT t."tokenHash", t.scopes,
         t."revokedAt" IS NOT NULL AS revoked,
         t."expiresAt" IS NOT NULL AND t."expiresAt" <= timezone('utc', now()) AS expired,
         i."publicId" AS "identityPublicId", i.status, i."workspaceId",
         w."deletedAt" IS NOT NULL AS "workspaceDeleted"
  FROM agent_token t
  JOIN agent_identity i ON i.id = t."agentIdentityId"
  JOIN workspace w ON w.id = i."workspaceId"
  WHERE t."publicId" = $1`;

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

export async function verifyAgentToken(db: pg.Pool | pg.Client, token: string): Promise<Verdict> {
  // 1-2. Form and checksum: refuse look-alikes and typos with no database or argon2 work.
  const match = TOKEN.exec(token);
  if (!match) return { valid: false, reason: "malformed" };
  const [, publicId, checksum] = match;
  if (base62(crc32(token.slice(0, -6)), 6) !== checksum) return { valid: false, reason: "bad_checksum" };

  // 3. One indexed lookup by the token's public id.
  const { rows } = await db.query<Row>(LOOKUP, [publicId]);
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
  return {
    valid: true,
    tokenPublicId: publicId,
    identityPublicId: row.identityPublicId,
    workspaceId: row.workspaceId,
    scopes: row.scopes,
  };
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
      if (line.trim()) process.stdout.write(JSON.stringify(await verifyAgentToken(db, line.trim())) + "\n");
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

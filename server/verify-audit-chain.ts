/**
 * The audit chain of docs/schema.md ("The audit chain"), implemented from that text
 * alone: a second verifier, apart from the Python of `agent-identity audit verify`
 * and the SQL that writes the chain, so the spec and both of them cannot drift.
 *
 * Run as a script with a workspace's public id, it reads that workspace's events in
 * chain order (every value as PostgreSQL's text), recomputes each hash and prints one
 * JSON line per event, then one for the chain:
 *
 *   DATABASE_URL=postgres://... npx tsx verify-audit-chain.ts Ab12Cd34Ef56
 */
import { createHash } from "node:crypto";
import { pathToFileURL } from "node:url";
import pg from "pg";

export const ENCODING = "agent-identity audit v1";
export const CHAIN_START = "0".repeat(64);

/** The values an event's hash covers, in the spec's order, as text (null for NULL). */
export interface ChainedEvent {
  sequence: string;
  workspacePublicId: string | null;
  publicId: string;
  action: string;
  identityPublicId: string | null;
  identitySlug: string | null;
  tokenPublicId: string | null;
  actorUserUuid: string | null;
  actorEmail: string | null;
  reason: string | null;
  metadata: string; // the jsonb's text, as PostgreSQL writes it
  createdAt: string; // timestamp text, "2026-11-29 10:26:43.5"
  previousHash: string | null;
  hash: string | null;
}

/** One field: its length in UTF-8 bytes, ":", its bytes, ","; NULL is "-,". */
export function field(value: string | null): Buffer {
  if (value === null) return Buffer.from("-,");
  const bytes = Buffer.from(value, "utf8");
  return Buffer.concat([Buffer.from(`${bytes.length}:`), bytes, Buffer.from(",")]);
}

/** A timestamp's text as the spec writes it: ISO 8601, six fractional digits, "Z". */
export function specTime(text: string): string {
  const [date, time] = text.split(" ");
  const [seconds, fraction = ""] = time.split(".");
  return `${date}T${seconds}.${fraction.padEnd(6, "0")}Z`;
}

export function eventHash(previousHash: string, e: ChainedEvent): string {
  const fields = [
    ENCODING, e.sequence, e.workspacePublicId, e.publicId, e.action, e.identityPublicId, e.identitySlug,
    e.tokenPublicId, e.actorUserUuid, e.actorEmail, e.reason, e.metadata, specTime(e.createdAt),
  ];
  return createHash("sha256")
    .update(Buffer.from(previousHash, "hex"))
    .update(Buffer.concat(fields.map(field)))
    .digest("hex");
}

const EVENTS = `
SELECT e."sequence"::text AS sequence, e."workspacePublicId", e."publicId", e.action, e."identityPublicId",
       e."identitySlug", e."tokenPublicId", e."actorUserUuid"::text AS "actorUserUuid", e."actorEmail", e.reason,
       e.metadata::text AS metadata, e."createdAt"::text AS "createdAt", e."previousHash", e.hash
FROM agent_audit_event e
JOIN workspace w ON w.id = e."workspaceId"
WHERE w."publicId" = $1 AND e."sequence" IS NOT NULL
ORDER BY e."sequence"`;

async function main(): Promise<void> {
  const workspace = process.argv[2];
  if (!workspace) throw new Error("usage: verify-audit-chain.ts WORKSPACE_PUBLIC_ID");
  const db = new pg.Client(process.env.DATABASE_URL ? { connectionString: process.env.DATABASE_URL } : {});
  await db.connect();
  try {
    const { rows } = await db.query<ChainedEvent>(EVENTS, [workspace]);
    let previous = CHAIN_START;
    let intact = true;
    for (const event of rows) {
      const hash = eventHash(previous, event);
      const linked = event.previousHash === previous;
      intact &&= linked && hash === event.hash;
      process.stdout.write(JSON.stringify({ sequence: Number(event.sequence), publicId: event.publicId, hash, linked }) + "\n");
      previous = event.hash ?? hash;
    }
    const last = rows[rows.length - 1];
    process.stdout.write(JSON.stringify({ intact, events: rows.length, head: last ? `${last.sequence}:${last.hash}` : null }) + "\n");
  } finally {
    await db.end();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((error: unknown) => {
    console.error(`verify-audit-chain: ${error instanceof Error ? error.message : String(error)}`);
    process.exitCode = 1;
  });
}

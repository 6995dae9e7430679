/**
 * The audit chain of docs/schema.md ("The audit chain"), implemented from that text
 * alone: a second verifier, apart from the Python of `agent-identity audit verify`
 * and the SQL that writes the chain, so the spec and both of them cannot drift.
 *
 * Run as a script with a workspace's public id, it reads that workspace's events in
 * chain order (every value as PostgreSQL's text; "createdAt" through to_char, so the
 * session's DateStyle cannot change it), recomputes each hash and prints one JSON line
 * per event, then one for the chain. The tables are those of the schema
 * AGENT_IDENTITY_DB_SCHEMA names (default public):
 *
 *   DATABASE_URL=postgres://... npx tsx verify-audit-chain.ts Ab12Cd34Ef56
 */
import { createHash } from "node:crypto";
import { pathToFileURL } from "node:url";
import pg from "pg";

export const ENCODING = "agent-identity audit v1"; // events that record no login (written before 0.5.0)
export const ENCODING_LOGIN = "agent-identity audit v2"; // v1's fields, then the login that wrote the event
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
  createdAt: string; // timestamp text, "2026-11-29 10:26:43.500000" (to_char's, year in 4 digits)
  previousHash: string | null;
  hash: string | null;
  login?: string | null; // the database login that wrote it; null (or absent) in a v1 event
}

/** One field: its length in UTF-8 bytes, ":", its bytes, ","; NULL is "-,". */
export function field(value: string | null): Buffer {
  if (value === null) return Buffer.from("-,");
  const bytes = Buffer.from(value, "utf8");
  return Buffer.concat([Buffer.from(`${bytes.length}:`), bytes, Buffer.from(",")]);
}

/**
 * A timestamp's text as the spec writes it: ISO 8601, six fractional digits, "Z"
 * ("0999-01-02T03:04:05.000000Z"). From "YYYY-MM-DD HH:MM:SS[.f...]", as events() reads it.
 */
export function specTime(text: string): string {
  if (!/^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,6})?$/.test(text)) {
    throw new Error(`not a timestamp as YYYY-MM-DD HH:MM:SS.ffffff: ${JSON.stringify(text)}`);
  }
  const [date, time] = text.split(" ");
  const [seconds, fraction = ""] = time.split(".");
  return `${date}T${seconds}.${fraction.padEnd(6, "0")}Z`;
}

export function eventHash(previousHash: string, e: ChainedEvent): string {
  const login = e.login ?? null;
  const fields = [
    login === null ? ENCODING : ENCODING_LOGIN, e.sequence, e.workspacePublicId, e.publicId, e.action,
    e.identityPublicId, e.identitySlug, e.tokenPublicId, e.actorUserUuid, e.actorEmail, e.reason, e.metadata,
    specTime(e.createdAt), ...(login === null ? [] : [login]),
  ];
  return createHash("sha256")
    .update(Buffer.from(previousHash, "hex"))
    .update(Buffer.concat(fields.map(field)))
    .digest("hex");
}

/** The schema that holds Kan's and the agent tables, quoted: a plain identifier only. */
export function schemaIdentifier(name: string = process.env.AGENT_IDENTITY_DB_SCHEMA || "public"): string {
  if (!/^(?!pg_)(?!information_schema$)[A-Za-z_][A-Za-z0-9_]{0,62}$/i.test(name)) {
    throw new Error(`AGENT_IDENTITY_DB_SCHEMA: ${JSON.stringify(name.slice(0, 80))} is not a schema name`);
  }
  return `"${name.replaceAll('"', '""')}"`;
}

// Every value as PostgreSQL's text, its type named with its schema (a temporary type
// named text would come first); "createdAt" as to_char writes it, which neither DateStyle
// nor TimeZone changes (the column has no zone), the year always in four digits:
// "0999-01-02 03:04:05.000000".
const events = (schema: string) => `
SELECT e."sequence"::pg_catalog.text AS sequence, e."workspacePublicId", e."publicId", e.action,
       e."identityPublicId", e."identitySlug", e."tokenPublicId", e."actorUserUuid"::pg_catalog.text AS "actorUserUuid",
       e."actorEmail", e.reason, e.metadata::pg_catalog.text AS metadata,
       pg_catalog.to_char(e."createdAt", 'YYYY-MM-DD HH24:MI:SS.US') AS "createdAt", e."previousHash", e.hash,
       e.login::pg_catalog.text AS login
FROM ${schema}.agent_audit_event e
JOIN ${schema}.workspace w ON w.id = e."workspaceId"
WHERE w."publicId" = $1 AND e."sequence" IS NOT NULL
ORDER BY e."sequence"`;

async function main(): Promise<void> {
  const workspace = process.argv[2];
  if (!workspace) throw new Error("usage: verify-audit-chain.ts WORKSPACE_PUBLIC_ID");
  const schema = schemaIdentifier();
  const db = new pg.Client(process.env.DATABASE_URL ? { connectionString: process.env.DATABASE_URL } : {});
  await db.connect();
  try {
    const { rows } = await db.query<ChainedEvent>(events(schema), [workspace]);
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

// Structured logging: one JSON object per line. Callers pass fields; secrets
// and tokens are never passed in, so nothing here has to scrub them.
import { env } from "./env.ts";

type Level = "debug" | "info" | "warn" | "error";
const rank: Record<Level | "silent", number> = {
  debug: 10,
  info: 20,
  warn: 30,
  error: 40,
  silent: 99,
};

function threshold(): number {
  try {
    return rank[env().LOG_LEVEL];
  } catch {
    return rank.info;
  }
}

export function log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
  if (rank[level] < threshold()) return;
  const line = JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields });
  if (level === "error" || level === "warn") console.error(line);
  else console.log(line);
}

// Request shapes the functions share, so one rule has one spelling.
import { z } from "zod";

/**
 * How deep a JSON value may nest. Postgres parses jsonb recursively and a few
 * thousand levels exhaust its stack (a 500 after the body was accepted).
 */
export const MAX_JSON_DEPTH = 100;

/** The deepest nesting in a JSON value (0 for a scalar), walked without recursion. */
export function jsonDepth(value: unknown): number {
  let deepest = 0;
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (typeof v !== "object" || v === null) continue;
    deepest = Math.max(deepest, depth + 1);
    if (deepest > MAX_JSON_DEPTH) return deepest;
    for (const child of Object.values(v)) stack.push([child, depth + 1]);
  }
  return deepest;
}

/** jsonDepth of the value a JSON text holds, read from the text without parsing it. */
export function jsonTextDepth(text: string): number {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "{" || c === "[") deepest = Math.max(deepest, ++depth);
    else if (c === "}" || c === "]") depth--;
  }
  return deepest;
}

/** Any JSON value, nested at most MAX_JSON_DEPTH levels. */
export const jsonValue = z.unknown().refine(
  (v) => jsonDepth(v) <= MAX_JSON_DEPTH,
  `JSON may nest at most ${MAX_JSON_DEPTH} levels`,
);

/**
 * The body of a route that takes none: nothing or `{}`. Anything else is a
 * 400, as unknown keys are on the other routes, so that a caller who thinks a
 * key does something (a batch of ids, say) is told it does not.
 */
export const noBody = z.object({}).strict().optional();

/** A JSON object: payloads, metadata, tags. */
export const jsonObject = z.record(z.string(), z.unknown()).refine(
  (v) => jsonDepth(v) <= MAX_JSON_DEPTH,
  `JSON may nest at most ${MAX_JSON_DEPTH} levels`,
);

/**
 * An ISO 8601 timestamp with an offset, which Postgres takes only within
 * ±15:59 (zod's format allows up to ±23:59).
 */
export const timestamp = z.iso.datetime({ offset: true }).refine(
  (v) => !/[+-](1[6-9]|2\d):\d{2}$/.test(v),
  "the UTC offset must be within ±15:59",
);

/** A non-empty string of at most `max` characters. */
export const text = (max: number) => z.string().min(1).max(max);

/** A bigint id as it appears in a path: digits without a leading zero. */
export const bigintId = z.string().regex(/^[1-9][0-9]{0,18}$/);

/**
 * A keyset cursor's timestamp: created_at as Postgres prints it, microseconds
 * included (see rpc's "cursor" select).
 */
export const cursorTimestamp = z.string().regex(/^\d{4}-\d{2}-\d{2}[ T][0-9:.+-]{8,32}$/);

/**
 * A whole number in a query string, in [min, max], `fallback` when absent.
 * Written as decimal digits only: coercion took "" for 0 and "0x2" for 2.
 */
export const queryInt = (min: number, max: number, fallback: number) =>
  z.string().regex(/^\d{1,15}$/, "must be a whole number").transform(Number)
    .pipe(z.number().min(min).max(max)).default(fallback);

/** A page size and an opaque cursor, as every list route takes them. */
export const pageQuery = {
  limit: queryInt(1, 500, 50),
  cursor: z.string().max(200).optional(),
};

/**
 * One item, or a batch of 1-1000 as `{"<key>": [...]}`, as `{ batch, items }`.
 * The body is checked as the shape it has (a batch when it carries `key`), so
 * a bad field is reported as itself: a union of the two would only say that
 * the body matches neither.
 */
export function oneOrBatch<T extends z.ZodType>(item: T, key: string) {
  const batch = z.object({ [key]: z.array(item).min(1).max(1000) }).strict();
  return z.unknown().transform((body, ctx): { batch: boolean; items: z.output<T>[] } => {
    const isBatch = typeof body === "object" && body !== null && !Array.isArray(body) &&
      key in body;
    const parsed = isBatch ? batch.safeParse(body) : item.safeParse(body);
    if (!parsed.success) {
      // already final (paths and messages set): passed on as they are
      ctx.issues.push(...(parsed.error.issues as z.core.$ZodRawIssue[]));
      return z.NEVER;
    }
    return isBatch
      ? { batch: true, items: (parsed.data as Record<string, z.output<T>[]>)[key] }
      : { batch: false, items: [parsed.data as z.output<T>] };
  });
}

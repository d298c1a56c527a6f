// Request shapes the functions share, so one rule has one spelling.
import { z } from "zod";

/** A JSON object: payloads, metadata, tags. */
export const jsonObject = z.record(z.string(), z.unknown());

/** A non-empty string of at most `max` characters. */
export const text = (max: number) => z.string().min(1).max(max);

/** A bigint id as it appears in a path: digits without a leading zero. */
export const bigintId = z.string().regex(/^[1-9][0-9]{0,18}$/);

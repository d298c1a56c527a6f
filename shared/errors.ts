// The one error type of the HTTP layer. Everything that fails a request ends
// up as an HttpError and is rendered in the project's single error shape.

export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: unknown,
    readonly headers?: Record<string, string>,
  ) {
    super(message);
    this.name = "HttpError";
  }
}

/**
 * An error the request's input earned, as opposed to a fault or contention: a
 * 4xx other than 401 and 403, which are about the caller's role and so are the
 * same for every item a batch holds. Split a failed batch on these only.
 */
export function isInputError(err: unknown): boolean {
  return err instanceof HttpError && err.status >= 400 && err.status < 500 &&
    err.status !== 401 && err.status !== 403;
}

export const badRequest = (code: string, message: string, details?: unknown) =>
  new HttpError(400, code, message, details);
export const unauthorized = (code: string, message: string) =>
  new HttpError(401, code, message, undefined, { "www-authenticate": 'Bearer realm="easymo"' });
export const forbidden = (message = "this role may not do that") =>
  new HttpError(403, "forbidden", message);
export const notFound = (message = "not found") => new HttpError(404, "not_found", message);
export const conflict = (code: string, message: string, details?: unknown) =>
  new HttpError(409, code, message, details);
export const payloadTooLarge = (limit: number) =>
  new HttpError(413, "payload_too_large", `request body exceeds ${limit} bytes`, { limit });
/**
 * A 503 that the same request may clear if sent again (Retry-After says
 * when): a dependency that did not answer, or a database transaction that
 * never started or was rolled back whole (or, for a connection lost at
 * commit, may have committed, which a keyed write replays).
 */
export const tryAgain = (code: string, message: string) =>
  new HttpError(503, code, message, undefined, { "retry-after": "1" });

export interface ErrorBody {
  error: { code: string; message: string; details: unknown };
  correlation_id: string;
}

/** The one error shape; every key always there, `details` null when an error has none. */
export function errorBody(err: HttpError, correlationId: string): ErrorBody {
  return {
    error: { code: err.code, message: err.message, details: err.details ?? null },
    correlation_id: correlationId,
  };
}

-- Housekeeping, run by every dispatcher tick: expired leases back to their queue (or
-- failed when out of attempts), due retries back to their queue, expired finished tasks
-- deleted, waiting tasks past their maximum queue age failed.
-- ARGV: prefix, now, limit, result_ttl. Returns {requeued, dead, promoted, reaped, expired}.
local limit, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local requeued, dead = requeue_expired(limit, ttl)
local promoted = promote_delayed(limit)
local reaped = reap(limit)
local expired = expire_queued(limit, ttl)
return {requeued, dead, promoted, reaped, expired}

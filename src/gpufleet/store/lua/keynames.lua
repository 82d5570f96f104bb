-- Test helper: the key names lib.lua builds, to compare with gpufleet.store.keys.
-- ARGV: prefix, now, id, pool, kind, model.
local id, pool, kind, model = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local qp = queue_of({pool = pool, kind = kind, model = model})
local qk, qks = queue_of({pool = '', kind = kind, model = ''})
return {k_task(id), k_events(id), qp, qk, k_pool_queues(pool), qks, k_delayed, k_leases,
        k_tasks, k_status('queued'), k_expiry, k_depth, k_inflight, k_seq, c_wake, c_task,
        c_cancel, k_deadlines}

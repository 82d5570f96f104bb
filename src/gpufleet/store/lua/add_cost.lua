-- Add spend to one worker's record: the reconciler's accounting, once per tick per worker.
-- KEYS: the worker hash. ARGV: usd.
-- Adds to cost_usd only if the record still exists (a worker removed meanwhile is not
-- brought back as a hash holding nothing but a cost); returns the new total, or false.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBYFLOAT', KEYS[1], 'cost_usd', ARGV[1])
end
return false

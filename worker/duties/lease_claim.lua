-- Take the lease if nobody holds it, or extend it if we do; in one step, so a lease that
-- expired and was taken by another process is never extended by its former holder.
-- KEYS[1]: the lease. ARGV[1]: our token, ARGV[2]: time to live in milliseconds.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0

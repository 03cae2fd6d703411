-- Replace the scope with a snapshot unless Redis already holds that revision or a newer one.
-- A "stale" hash is a floor left by a writer: it holds no values, only the revision below
-- which no snapshot may land (so a reader that loaded before a commit cannot undo it).
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local new = tonumber(ARGV[3])
if cur then
  cur = tonumber(cur)
  if cur > new then return 0 end
  if cur == new and redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1

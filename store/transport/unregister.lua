-- A consumer closing cleanly: whatever its taken list still holds goes back on the queue, and
-- the consumer leaves the registry (unless its entry changed: then it is not ours to drop).
-- KEYS[1]: its taken list, KEYS[2]: the registry.
-- ARGV[1]: the queue, ARGV[2]: its token, ARGV[3]: its entry.
local moved = 0
while redis.call('LMOVE', KEYS[1], ARGV[1], 'LEFT', 'RIGHT') do
    moved = moved + 1
end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then
    redis.call('HDEL', KEYS[2], ARGV[2])
end
return moved

-- A consumer about to take on a new connection: whatever its taken list holds was taken on a
-- connection that is gone and never recorded (nothing is in flight now), so it goes back on
-- the queue; then the consumer (re-)registers.
-- KEYS[1]: its taken list, KEYS[2]: the registry.
-- ARGV[1]: the queue, ARGV[2]: its token, ARGV[3]: its new entry.
local moved = 0
while redis.call('LMOVE', KEYS[1], ARGV[1], 'LEFT', 'RIGHT') do
    moved = moved + 1
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return moved

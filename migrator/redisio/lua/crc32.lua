-- Prepended (before lib.lua) to the scripts that route members themselves.
-- crc32 is the IEEE polynomial, byte-for-byte equal to Python's zlib.crc32 (routing.py has
-- the test vectors); the table literal is generated so nothing is computed per call.
local CRC_T = {__CRC_TABLE__}
local bxor, band, rshift = bit.bxor, bit.band, bit.rshift
local sbyte = string.byte
local function crc32(s)
  local crc = 0xFFFFFFFF
  for i = 1, #s do
    crc = bxor(rshift(crc, 8), CRC_T[band(bxor(crc, sbyte(s, i)), 0xFF) + 1])
  end
  return bxor(crc, 0xFFFFFFFF) % 4294967296
end

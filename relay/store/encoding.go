package store

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Records are fixed-layout big-endian binary, shared by both stores' keys
// and by the bbolt values: they are on the hot path and in every page.

var errCorrupt = errors.New("corrupt record")

// refLen is the length of a per-target key: the receipt time (so that keys
// sort oldest first) followed by the event id.
const refLen = 8 + len(ID{})

func makeRef(receivedAt time.Time, id ID) []byte {
	k := make([]byte, refLen)
	binary.BigEndian.PutUint64(k, uint64(receivedAt.UnixNano()))
	copy(k[8:], id[:])
	return k
}

func parseRef(k []byte) (time.Time, ID, error) {
	var id ID
	if len(k) != refLen {
		return time.Time{}, id, errCorrupt
	}
	copy(id[:], k[8:])
	return time.Unix(0, int64(binary.BigEndian.Uint64(k))), id, nil
}

// decodeBody reads the content type stored before the body bytes.
func decodeBody(b []byte) (ctype string, body []byte, err error) {
	if len(b) < 2 {
		return "", nil, errCorrupt
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return "", nil, errCorrupt
	}
	body = make([]byte, len(b)-2-n)
	copy(body, b[2+n:])
	return string(b[2 : 2+n]), body, nil
}

func unixNano(t time.Time) uint64 {
	if t.IsZero() {
		return 0
	}
	return uint64(t.UnixNano())
}

func fromUnixNano(n uint64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, int64(n))
}

// encodeDelivery stores the per-target state; id, target and receipt time
// live in the key and bucket name.
func encodeDelivery(d *Delivery) []byte {
	e := d.LastError
	if len(e) > 1024 {
		e = e[:1024]
	}
	b := make([]byte, 4+8+8+8+2+2+len(e))
	binary.BigEndian.PutUint32(b, uint32(d.Attempts))
	binary.BigEndian.PutUint64(b[4:], unixNano(d.NextAt))
	binary.BigEndian.PutUint64(b[12:], unixNano(d.FirstAttemptAt))
	binary.BigEndian.PutUint64(b[20:], unixNano(d.LastAttemptAt))
	binary.BigEndian.PutUint16(b[28:], uint16(d.LastStatus))
	binary.BigEndian.PutUint16(b[30:], uint16(len(e)))
	copy(b[32:], e)
	return b
}

func decodeDelivery(target string, k, v []byte) (*Delivery, error) {
	at, id, err := parseRef(k)
	if err != nil {
		return nil, err
	}
	if len(v) < 32 {
		return nil, errCorrupt
	}
	n := int(binary.BigEndian.Uint16(v[30:]))
	if len(v) < 32+n {
		return nil, errCorrupt
	}
	return &Delivery{
		ID:             id,
		Target:         target,
		ReceivedAt:     at,
		Attempts:       int(binary.BigEndian.Uint32(v)),
		NextAt:         fromUnixNano(binary.BigEndian.Uint64(v[4:])),
		FirstAttemptAt: fromUnixNano(binary.BigEndian.Uint64(v[12:])),
		LastAttemptAt:  fromUnixNano(binary.BigEndian.Uint64(v[20:])),
		LastStatus:     int(binary.BigEndian.Uint16(v[28:])),
		LastError:      string(v[32 : 32+n]),
	}, nil
}

// cursor encoding for DeadLetters: target, NUL, ref.
func encodeCursor(target string, ref []byte) string {
	return hex.EncodeToString(append(append([]byte(target), 0), ref...))
}

func decodeCursor(c string) (target string, ref []byte, err error) {
	b, err := hex.DecodeString(c)
	if err != nil {
		return "", nil, errors.New("invalid cursor")
	}
	for i, x := range b {
		if x == 0 {
			if len(b)-i-1 != refLen {
				return "", nil, errors.New("invalid cursor")
			}
			return string(b[:i]), b[i+1:], nil
		}
	}
	return "", nil, errors.New("invalid cursor")
}

// decodeItem reads what a queue keeps of a pending delivery, without the
// allocations of decodeDelivery: a restart may load a million.
func decodeItem(k, v []byte) (item, error) {
	if len(k) != refLen || len(v) < 32 {
		return item{}, errCorrupt
	}
	it := item{
		due:      int64(binary.BigEndian.Uint64(v[4:])),
		recv:     int64(binary.BigEndian.Uint64(k)),
		first:    int64(binary.BigEndian.Uint64(v[12:])),
		attempts: int32(binary.BigEndian.Uint32(v)),
	}
	copy(it.id[:], k[8:])
	return it, nil
}

// stateKey is a key state's key: its space, NUL, its key. A space with a
// NUL in it would make two records share one.
func stateKey(space, key string) ([]byte, error) {
	if strings.IndexByte(space, 0) >= 0 {
		return nil, fmt.Errorf("key state space %q contains a NUL byte", space)
	}
	k := make([]byte, 0, len(space)+1+len(key))
	k = append(k, space...)
	k = append(k, 0)
	return append(k, key...), nil
}

// A key state's value: revision, expiry (unix ns, 0: never), the bytes.
const stateHeaderLen = 16

func encodeState(rev uint64, expiry time.Time, value []byte) []byte {
	b := make([]byte, stateHeaderLen+len(value))
	binary.BigEndian.PutUint64(b, rev)
	binary.BigEndian.PutUint64(b[8:], unixNano(expiry))
	copy(b[stateHeaderLen:], value)
	return b
}

func decodeState(b []byte) (rev uint64, expiry int64, value []byte, err error) {
	if len(b) < stateHeaderLen {
		return 0, 0, nil, errCorrupt
	}
	return binary.BigEndian.Uint64(b), int64(binary.BigEndian.Uint64(b[8:])), b[stateHeaderLen:], nil
}

// stateExpired reports whether a state expiring at expiry (unix ns, 0:
// never) is gone at now.
func stateExpired(expiry int64, now time.Time) bool {
	return expiry != 0 && expiry <= now.UnixNano()
}

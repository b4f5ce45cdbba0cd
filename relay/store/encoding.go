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

// A delivery record: attempts, next attempt, first attempt, last attempt,
// last status, the last error's length, the last error; then, for a
// delivery with an order key only, its place in queue order and the key
// (length first).
//
// The order is an extension that keeps the file at format 1: records
// without a key are the bytes they always were, and a relay from before
// reads a record with one (ignoring what follows the error) as unkeyed.
const (
	deliveryLen = 4 + 8 + 8 + 8 + 2 + 2
	orderLen    = 8 + 2
	// maxOrderKey bounds a stored key: a longer one is cut, which can
	// only make two keys one, holding more in order, never less.
	maxOrderKey = 1<<16 - 1
)

// encodeDelivery stores the per-target state; id, target and receipt time
// live in the key and bucket name. seq is the delivery's place in queue
// order, kept only with an order key.
func encodeDelivery(d *Delivery, seq uint64) []byte {
	e := d.LastError
	if len(e) > 1024 {
		e = e[:1024]
	}
	key := d.OrderKey
	if len(key) > maxOrderKey {
		key = key[:maxOrderKey]
	}
	n := deliveryLen + len(e)
	if key != "" {
		n += orderLen + len(key)
	}
	b := make([]byte, n)
	binary.BigEndian.PutUint32(b, uint32(d.Attempts))
	binary.BigEndian.PutUint64(b[4:], unixNano(d.NextAt))
	binary.BigEndian.PutUint64(b[12:], unixNano(d.FirstAttemptAt))
	binary.BigEndian.PutUint64(b[20:], unixNano(d.LastAttemptAt))
	binary.BigEndian.PutUint16(b[28:], uint16(d.LastStatus))
	binary.BigEndian.PutUint16(b[30:], uint16(len(e)))
	copy(b[deliveryLen:], e)
	if key != "" {
		o := b[deliveryLen+len(e):]
		binary.BigEndian.PutUint64(o, seq)
		binary.BigEndian.PutUint16(o[8:], uint16(len(key)))
		copy(o[orderLen:], key)
	}
	return b
}

// deliveryOrder reads a delivery record's place in queue order and order
// key (0 and none for a record without a key), the key aliasing v.
func deliveryOrder(v []byte) (seq uint64, key []byte, err error) {
	if len(v) < deliveryLen {
		return 0, nil, errCorrupt
	}
	end := deliveryLen + int(binary.BigEndian.Uint16(v[30:]))
	switch {
	case len(v) < end:
		return 0, nil, errCorrupt
	case len(v) == end:
		return 0, nil, nil
	case len(v) < end+orderLen:
		return 0, nil, errCorrupt
	}
	o := v[end:]
	n := int(binary.BigEndian.Uint16(o[8:]))
	if len(o) < orderLen+n {
		return 0, nil, errCorrupt
	}
	return binary.BigEndian.Uint64(o), o[orderLen : orderLen+n], nil
}

func decodeDelivery(target string, k, v []byte) (*Delivery, error) {
	at, id, err := parseRef(k)
	if err != nil {
		return nil, err
	}
	_, key, err := deliveryOrder(v)
	if err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(v[30:]))
	return &Delivery{
		ID:             id,
		Target:         target,
		ReceivedAt:     at,
		Attempts:       int(binary.BigEndian.Uint32(v)),
		NextAt:         fromUnixNano(binary.BigEndian.Uint64(v[4:])),
		OrderKey:       string(key),
		FirstAttemptAt: fromUnixNano(binary.BigEndian.Uint64(v[12:])),
		LastAttemptAt:  fromUnixNano(binary.BigEndian.Uint64(v[20:])),
		LastStatus:     int(binary.BigEndian.Uint16(v[28:])),
		LastError:      string(v[deliveryLen : deliveryLen+n]),
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
// allocations of decodeDelivery: a restart may load a million. key (nil
// for none) aliases v.
func decodeItem(k, v []byte) (it item, seq uint64, key []byte, err error) {
	if len(k) != refLen || len(v) < deliveryLen {
		return item{}, 0, nil, errCorrupt
	}
	if len(v) != deliveryLen+int(binary.BigEndian.Uint16(v[30:])) {
		if seq, key, err = deliveryOrder(v); err != nil {
			return item{}, 0, nil, err
		}
	}
	it = item{
		due:      int64(binary.BigEndian.Uint64(v[4:])),
		recv:     int64(binary.BigEndian.Uint64(k)),
		first:    int64(binary.BigEndian.Uint64(v[12:])),
		attempts: int32(binary.BigEndian.Uint32(v)),
	}
	copy(it.id[:], k[8:])
	return it, seq, key, nil
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

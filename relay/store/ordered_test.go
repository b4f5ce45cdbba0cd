package store

import (
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// TestItemSize: the order key fits in an item's padding, and a lease
// keeps its size class, so that deliveries without keys cost what they
// did.
func TestItemSize(t *testing.T) {
	if n := unsafe.Sizeof(item{}); n != 48 {
		t.Errorf("an item is %d bytes, want 48", n)
	}
	// A lease per Take: the key must not move it to the next size class.
	if n := unsafe.Sizeof(localLease{}); n > 96 {
		t.Errorf("a lease is %d bytes, want 96 at most", n)
	}
}

// TestDeliveryRecordOrder: a delivery without an order key is stored in
// exactly the bytes of format 1; one with a key carries it and its place
// in queue order after the last error, where a relay from before reads
// past them.
func TestDeliveryRecordOrder(t *testing.T) {
	d := Delivery{
		Attempts: 3, NextAt: testT0, FirstAttemptAt: testT0.Add(-time.Minute), LastAttemptAt: testT0,
		LastStatus: 503, LastError: "503 Service Unavailable",
	}
	if v := encodeDelivery(&d, 7); len(v) != deliveryLen+len(d.LastError) {
		t.Errorf("unkeyed record of %d bytes, want the %d of format 1", len(v), deliveryLen+len(d.LastError))
	}
	ref := makeRef(testT0.Add(-time.Hour), testID(1))
	for _, key := range []string{"", "k", strings.Repeat("é", 300)} {
		d.OrderKey = key
		v := encodeDelivery(&d, 42)
		got, err := decodeDelivery("a", ref, v)
		if err != nil {
			t.Fatalf("decodeDelivery(key %q): %v", key, err)
		}
		want := d
		want.ID, want.Target, want.ReceivedAt = testID(1), "a", testT0.Add(-time.Hour)
		if got.OrderKey != want.OrderKey || got.LastError != want.LastError || got.Attempts != want.Attempts ||
			!got.NextAt.Equal(want.NextAt) || !got.FirstAttemptAt.Equal(want.FirstAttemptAt) || got.LastStatus != want.LastStatus {
			t.Errorf("decodeDelivery(key %q) = %+v, want %+v", key, *got, want)
		}
		it, seq, k, err := decodeItem(ref, v)
		if err != nil {
			t.Fatalf("decodeItem(key %q): %v", key, err)
		}
		wantSeq := uint64(42)
		if key == "" {
			wantSeq = 0
		}
		if string(k) != key || seq != wantSeq || it.id != testID(1) || it.attempts != 3 || it.due != testT0.UnixNano() {
			t.Errorf("decodeItem(key %q) = %+v, seq %d, key %q", key, it, seq, k)
		}
		// What a relay from before reads: the error, whatever follows it.
		if n := binary.BigEndian.Uint16(v[30:]); string(v[deliveryLen:deliveryLen+int(n)]) != d.LastError {
			t.Errorf("key %q: the last error is not where format 1 has it", key)
		}
	}

	d.OrderKey = "key"
	v := encodeDelivery(&d, 1)
	end := deliveryLen + len(d.LastError)
	for _, cut := range []int{end + 1, end + orderLen - 1, len(v) - 1} {
		if _, _, err := deliveryOrder(v[:cut]); !errors.Is(err, errCorrupt) {
			t.Errorf("record cut to %d of %d bytes: %v, want errCorrupt", cut, len(v), err)
		}
	}
	d.OrderKey = strings.Repeat("x", maxOrderKey+10)
	if _, key, err := deliveryOrder(encodeDelivery(&d, 1)); err != nil || len(key) != maxOrderKey {
		t.Errorf("an overlong key stored as %d bytes, %v; want cut to %d", len(key), err, maxOrderKey)
	}
}

// TestBoltOrderedHeldWhileLoading: while a target's backlog loads, its
// ordered queue serves deliveries without a key at once, but none with a
// key (an earlier one of the key may not be queued yet), not even one
// accepted meanwhile; once loaded, each key goes in the order accepted.
func TestBoltOrderedHeldWhileLoading(t *testing.T) {
	clock := newFakeClock(testT0.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	keyed := func(s Store, n int, at time.Time) {
		t.Helper()
		opts := AcceptOptions{KeyExpiry: testT0.Add(24 * time.Hour), OrderKeys: []string{"k"}}
		if dup, err := s.Accept(ctx, testEvent(n, at), []string{"a"}, opts); err != nil || dup {
			t.Fatalf("Accept(%d) = %v, %v", n, dup, err)
		}
	}
	// A first batch without keys, then two of k received after it: they
	// load in the second batch.
	fillBolt(t, s, 0, loadBatch, "a")
	keyed(s, loadBatch, testT0.Add(time.Second))
	keyed(s, loadBatch+1, testT0.Add(2*time.Second))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	reached, gate := make(chan struct{}), make(chan struct{})
	var batches atomic.Int32
	s, err = OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now, afterBatch: func() {
		if batches.Add(1) == 1 {
			close(reached)
			<-gate
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	<-reached
	q, err := s.Queue("a", QueueOptions{Lease: time.Minute, Ordered: true})
	if err != nil {
		t.Fatal(err)
	}
	late := loadBatch + 2
	keyed(s, late, clock.Now())
	mustAccept(t, s, testEvent(late+1, clock.Now()), "a")
	got := takeAll(t, q, false)
	checkOnce(t, got, loadBatch+1)
	for _, n := range []int{loadBatch, loadBatch + 1, late} {
		if got[testID(n)] != 0 {
			t.Errorf("keyed %d handed out while the backlog loaded", n)
		}
	}
	close(gate)
	waitLoaded(t, s)
	for _, n := range []int{loadBatch, loadBatch + 1, late} {
		l := takeWithin(t, q, 5*time.Second)
		if d := l.Delivery(); d.ID != testID(n) || d.OrderKey != "k" {
			t.Fatalf("Take = %s (order key %q), want %s of k", d.ID, d.OrderKey, testID(n))
		}
		noTake(t, q)
		settleNow(t, l, Delivered, &Delivery{Attempts: 1})
	}
	checkCounts(t, s)
}

// TestBoltOrderedPreviousRelease: the deliveries of a file from before
// order keys have none: an ordered queue holds none of them back.
func TestBoltOrderedPreviousRelease(t *testing.T) {
	path := unzipFixture(t, "v0-relay.db", t.TempDir())
	s := openTestBolt(t, path, newFakeClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)).Now)
	waitLoaded(t, s)
	q, err := s.Queue("b", QueueOptions{Lease: time.Minute, Ordered: true})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if d := takeWithin(t, q, 5*time.Second).Delivery(); d.OrderKey != "" {
			t.Errorf("delivery %s of the old file has order key %q", d.ID, d.OrderKey)
		}
	}
	noTake(t, q)
	for _, d := range pendingOf(t, s) {
		if d.OrderKey != "" {
			t.Errorf("pending %s at %s of the old file has order key %q", d.ID, d.Target, d.OrderKey)
		}
	}
}

// TestTargetKeys: order keys follow their targets when repeated targets
// are dropped, and must match them in number.
func TestTargetKeys(t *testing.T) {
	targets, keys, err := targetKeys([]string{"a", "b", "a", "c"}, []string{"1", "", "3", "4"})
	if err != nil || strings.Join(targets, ",") != "a,b,c" || strings.Join(keys, ",") != "1,,4" {
		t.Errorf("targetKeys = %q, %q, %v; want a,b,c and 1,,4", targets, keys, err)
	}
	if _, keys, err := targetKeys([]string{"a", "b"}, []string{"", ""}); err != nil || keys != nil {
		t.Errorf("targetKeys without a key = %q, %v; want nil", keys, err)
	}
	if _, _, err := targetKeys([]string{"a", "b"}, []string{"k"}); err == nil {
		t.Error("one order key for two targets accepted")
	}
}

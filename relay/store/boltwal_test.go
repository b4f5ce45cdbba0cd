package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// walTestEvent is an event whose body has the same length for every n
// below 10,000, so that records of one run line up with another's.
func walTestEvent(n int) *Event {
	return &Event{ID: testID(n), ReceivedAt: testT0.Add(time.Duration(n) * time.Second), ContentType: "application/json",
		Body: fmt.Appendf(nil, `{"n":%04d}`, n)}
}

// openHeldBolt opens a store whose writer never applies logged events:
// once closed, they are in the log alone, as after a crash.
func openHeldBolt(t *testing.T, path string, now func() time.Time) *Bolt {
	t.Helper()
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: now, holdLog: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustClose(t *testing.T, s *Bolt) {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func wantFormat(t *testing.T, path string, want uint32) {
	t.Helper()
	if v := readFormat(t, path); len(v) != 4 || binary.BigEndian.Uint32(v) != want {
		t.Errorf("format key %x, want %d", v, want)
	}
}

// checkStored checks that ev is stored whole, pending at targets, and seen.
func checkStored(t *testing.T, s *Bolt, ev *Event, targets ...string) {
	t.Helper()
	ctx := context.Background()
	if seen, err := s.Seen(ctx, ev.ID, ev.ReceivedAt); err != nil || !seen {
		t.Errorf("Seen(%s) = %v, %v; want true", ev.ID, seen, err)
	}
	st, err := s.Lookup(ctx, ev.ID)
	if err != nil {
		t.Errorf("Lookup(%s): %v", ev.ID, err)
		return
	}
	if !bytes.Equal(st.Event.Body, ev.Body) || st.Event.ContentType != ev.ContentType || !st.Event.ReceivedAt.Equal(ev.ReceivedAt) {
		t.Errorf("Lookup(%s): %q %q %v, want %q %q %v", ev.ID, st.Event.Body, st.Event.ContentType, st.Event.ReceivedAt,
			ev.Body, ev.ContentType, ev.ReceivedAt)
	}
	var at []string
	for _, d := range st.Pending {
		at = append(at, d.Target)
	}
	slices.Sort(at)
	if !slices.Equal(at, targets) {
		t.Errorf("Lookup(%s): pending at %v, want %v", ev.ID, at, targets)
	}
}

func checkAbsent(t *testing.T, s *Bolt, ev *Event) {
	t.Helper()
	ctx := context.Background()
	if seen, err := s.Seen(ctx, ev.ID, ev.ReceivedAt); err != nil || seen {
		t.Errorf("Seen(%s) = %v, %v; want false", ev.ID, seen, err)
	}
	if st, err := s.Lookup(ctx, ev.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Lookup(%s) = %v, %v; want not found", ev.ID, st.Event, err)
	}
}

// takeIDs takes n deliveries from q and returns their ids.
func takeIDs(t *testing.T, q Queue, n int) map[ID]bool {
	t.Helper()
	got := map[ID]bool{}
	for range n {
		l := takeWithin(t, q, 5*time.Second)
		got[l.Delivery().ID] = true
		if !bytes.Equal(l.Event().Body, walTestEventBody(l.Delivery().ID)) {
			t.Errorf("taken %s with body %q", l.Delivery().ID, l.Event().Body)
		}
	}
	return got
}

// walTestEventBody is the body walTestEvent gave the event id names.
func walTestEventBody(id ID) []byte {
	n, err := strconv.Atoi(strings.TrimLeft(strings.TrimPrefix(string(id[:]), "event-"), "0"))
	if err != nil {
		return nil
	}
	return walTestEvent(n).Body
}

// TestBoltWALHeldEventsReplayAtOpen: events in the log alone (the file
// says so: format 2) are in the store after the next open, once, and a
// clean close then writes format 1 back.
func TestBoltWALHeldEventsReplayAtOpen(t *testing.T) {
	clock := newFakeClock(testT0.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "relay.db")
	s := openHeldBolt(t, path, clock.Now)
	for n := 1; n <= 3; n++ {
		mustAccept(t, s, walTestEvent(n), "a", "b")
	}
	// Held: the file has none of them.
	if st, err := s.Stats(time.Time{}); err != nil || st.PendingEvents != 0 {
		t.Fatalf("Stats with the events held in the log = %+v, %v", st, err)
	}
	mustClose(t, s)
	wantFormat(t, path, formatLogged)

	for run := range 2 {
		s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
		if err != nil {
			t.Fatalf("run %d: OpenBolt of a file with a log: %v", run, err)
		}
		waitLoaded(t, s)
		for n := 1; n <= 3; n++ {
			checkStored(t, s, walTestEvent(n), "a", "b")
		}
		c := checkCounts(t, s)
		if c.PendingEvents != 3 || c.Targets["a"].Pending != 3 || c.Targets["b"].Pending != 3 {
			t.Errorf("run %d: counts %+v, want 3 events pending at a and b", run, c)
		}
		mustClose(t, s)
		wantFormat(t, path, formatVersion)
	}
}

// TestBoltWALSettledBeforeApplyReplaysPending: a delivery of an event in
// the log alone, taken and delivered, then the process dies before the
// apply. The settle's commit finds no event in the file and changes
// nothing; after the next open the event replays as pending and is
// delivered again (at least once, never lost), its counts consistent.
func TestBoltWALSettledBeforeApplyReplaysPending(t *testing.T) {
	clock := newFakeClock(testT0.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "relay.db")
	s := openHeldBolt(t, path, clock.Now)
	mustAccept(t, s, walTestEvent(1), "a")
	mustAccept(t, s, walTestEvent(2), "a")
	l := takeWithin(t, mustQueue(t, s, "a"), 5*time.Second)
	delivered := l.Delivery().ID
	settleNow(t, l, Delivered, &Delivery{Attempts: 1, LastStatus: 200})
	mustClose(t, s)

	s = reopenBolt(t, path, clock.Now)
	checkStored(t, s, walTestEvent(1), "a")
	checkStored(t, s, walTestEvent(2), "a")
	c := checkCounts(t, s)
	if c.PendingEvents != 2 || c.Targets["a"].Pending != 2 {
		t.Errorf("counts %+v, want both events pending at a", c)
	}
	q := mustQueue(t, s, "a")
	got := takeIDs(t, q, 2)
	if !got[delivered] {
		t.Errorf("the delivery settled before the apply is not delivered again")
	}
	// Delivered now, in the file: gone for good.
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		_, err := q.Take(ctx)
		cancel()
		if err == nil {
			t.Fatal("a third delivery of two events")
		}
	}
	mustClose(t, s)
	wantFormat(t, path, formatVersion)
}

// TestBoltWALDedupe: an event in the log alone is a duplicate, and seen,
// in its own run and after its replay; a key without targets too, until
// it expires; and of one event accepted by many at once, one is new.
func TestBoltWALDedupe(t *testing.T) {
	clock := newFakeClock(testT0.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "relay.db")
	ctx := context.Background()
	ev := walTestEvent(1)
	key := walTestEvent(2)
	keyOpts := AcceptOptions{KeyExpiry: key.ReceivedAt.Add(time.Hour)}
	check := func(s *Bolt, when string) {
		t.Helper()
		again := *ev
		again.ReceivedAt = ev.ReceivedAt.Add(time.Minute)
		if dup, err := s.Accept(ctx, &again, []string{"a"}, AcceptOptions{KeyExpiry: again.ReceivedAt.Add(time.Hour)}); err != nil || !dup {
			t.Errorf("%s: Accept of a logged event again = %v, %v; want a duplicate", when, dup, err)
		}
		if dup, err := s.Accept(ctx, key, nil, keyOpts); err != nil || !dup {
			t.Errorf("%s: Accept of a logged key again = %v, %v; want a duplicate", when, dup, err)
		}
		for _, id := range []ID{ev.ID, key.ID} {
			if seen, err := s.Seen(ctx, id, key.ReceivedAt.Add(30*time.Minute)); err != nil || !seen {
				t.Errorf("%s: Seen(%s) = %v, %v", when, id, seen, err)
			}
		}
		if seen, err := s.Seen(ctx, key.ID, keyOpts.KeyExpiry); err != nil || seen {
			t.Errorf("%s: Seen of a key at its expiry = %v, %v; want false", when, seen, err)
		}
	}
	s := openHeldBolt(t, path, clock.Now)
	mustAccept(t, s, ev, "a")
	if dup, err := s.Accept(ctx, key, nil, keyOpts); err != nil || dup {
		t.Fatalf("Accept of a key = %v, %v", dup, err)
	}
	// Many Accepts of one event at once, likely in one group.
	var wg sync.WaitGroup
	var mu sync.Mutex
	fresh := 0
	for range 8 {
		wg.Go(func() {
			dup, err := s.Accept(ctx, walTestEvent(3), []string{"a"}, AcceptOptions{KeyExpiry: testT0.Add(2 * time.Hour)})
			if err != nil {
				t.Errorf("Accept: %v", err)
			}
			mu.Lock()
			if !dup {
				fresh++
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	if fresh != 1 {
		t.Errorf("%d of 8 Accepts of one event at once were new, want 1", fresh)
	}
	check(s, "logged")
	mustClose(t, s)

	s = reopenBolt(t, path, clock.Now)
	check(s, "replayed")
	c := checkCounts(t, s)
	if c.PendingEvents != 2 || c.Targets["a"].Pending != 2 {
		t.Errorf("counts %+v, want events 1 and 3 pending at a", c)
	}
	mustClose(t, s)
}

// writeSparse writes data to a new file at path, its pages of zeros as
// holes: a bbolt file grows in steps of 16 MiB, a segment is megabytes of
// zeros, and a test copies them hundreds of times.
func writeSparse(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zero := make([]byte, 4096)
	for off := 0; off < len(data); off += len(zero) {
		page := data[off:min(off+len(zero), len(data))]
		if bytes.Equal(page, zero[:len(page)]) {
			continue
		}
		if _, err := f.WriteAt(page, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(int64(len(data))); err != nil {
		t.Fatal(err)
	}
}

// readSegments returns the contents of the log's segments by name.
func readSegments(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for _, name := range segmentFiles(t, dir) {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(name)] = data
	}
	return out
}

// reopenBolt opens the store at path again, closed at the test's end,
// and waits for its backlog.
func reopenBolt(t *testing.T, path string, now func() time.Time) *Bolt {
	t.Helper()
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	waitLoaded(t, s)
	return s
}

// chainOf returns the valid records of a segment's contents, of the log
// its header names (the store's id is in its file's meta).
func chainOf(t *testing.T, data []byte) []walRecord {
	t.Helper()
	var id uint64
	if len(data) >= walHeaderLen {
		id = binary.LittleEndian.Uint64(data[8:])
	}
	return segmentRecords(t, data, id)
}

// syscallWrites is how many write system calls the process has made, if
// the system says.
func syscallWrites() (int, bool) {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "syscw: "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			return n, err == nil
		}
	}
	return 0, false
}

// TestBoltWALTornLastGroup is the power loss: events acked one group at
// a time, then a last group whose write is torn at every byte offset
// (past the tear: the records a run before left there, zeros, or a file
// that ends), each tear opened on a copy of the store. Every event acked
// before the last group is there, whole, counted and delivered; of the
// last group, each event whose record was written whole is there whole
// too and the others are absent: never half of one.
func TestBoltWALTornLastGroup(t *testing.T) {
	const earlier, last = 3, 2
	targets := []string{"a", "b"}
	clock := newFakeClock(testT0.Add(time.Hour))
	path := filepath.Join(t.TempDir(), "relay.db")

	// A run before, applied and delivered: its records stay in the
	// segment, which the next run writes over from its start. Its
	// events have the same sizes, so their records line up.
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	for n := 100; n < 100+earlier+last+3; n++ {
		mustAccept(t, s, walTestEvent(n), targets...)
	}
	for _, target := range targets {
		q := mustQueue(t, s, target)
		for range earlier + last + 3 {
			settleNow(t, takeWithin(t, q, 5*time.Second), Delivered, &Delivery{Attempts: 1})
		}
	}
	mustClose(t, s)
	olds := readSegments(t, path+walExt)

	// The run that dies: its events in the log alone.
	s = openHeldBolt(t, path, clock.Now)
	for n := 1; n <= earlier; n++ {
		mustAccept(t, s, walTestEvent(n), targets...)
	}
	writes, counted := syscallWrites()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for n := earlier + 1; n <= earlier+last; n++ {
		wg.Go(func() {
			<-start
			ev := walTestEvent(n)
			if dup, err := s.Accept(context.Background(), ev, targets, AcceptOptions{KeyExpiry: ev.ReceivedAt.Add(time.Hour)}); err != nil || dup {
				t.Errorf("Accept(%s) = %v, %v", ev.ID, dup, err)
			}
		})
	}
	close(start)
	wg.Wait()
	if after, ok := syscallWrites(); counted && ok {
		t.Logf("the last %d events took %d writes", last, after-writes)
	}
	mustClose(t, s)
	if t.Failed() {
		t.FailNow()
	}
	finals := readSegments(t, path+walExt)
	dbFile, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	// The segment the run wrote, where each record ends, and whose it is.
	var seg string
	var recs []walRecord
	for name, data := range finals {
		r := chainOf(t, data)
		if len(r) > 0 && (len(recs) == 0 || r[len(r)-1].seq > recs[len(recs)-1].seq) {
			seg, recs = name, r
		}
	}
	if len(recs) != earlier+last {
		t.Fatalf("the segment %s has %d records in its chain, want %d", seg, len(recs), earlier+last)
	}
	var ends []int
	var evs []*Event
	off := walHeaderLen
	for _, r := range recs {
		off += walRecHeadLen + len(r.payload)
		ends = append(ends, off)
		l, err := decodeLogged(r.seq, r.payload)
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, walTestEventOf(t, l.ev.ID))
	}
	from, to := ends[earlier-1], ends[earlier+last-1]
	final := finals[seg]
	size := len(final)
	old := bytes.TrimRight(olds[seg], "\x00")
	final = bytes.TrimRight(final, "\x00")
	before := append([]byte(nil), final[:from]...)
	if len(old) > from {
		before = append(before, old[from:]...)
	}
	t.Logf("the last group: bytes %d to %d of %s; the run before left %d bytes there", from, to, filepath.Base(seg), len(old))

	// Every offset with what was there before (the hardest: records of
	// the run before, or zeros); the other two at and next to each
	// record's end (the log's own test tears at every offset with all
	// three).
	boundary := map[int]bool{}
	for _, e := range ends[earlier-1:] {
		boundary[e-1], boundary[e], boundary[e+1] = true, true, true
	}
	scratch := t.TempDir()
	for o := from; o <= to; o++ {
		for name, torn := range tornVariants(final, before, size, o) {
			if name != "old" && !boundary[o] {
				continue
			}
			dir := filepath.Join(scratch, fmt.Sprintf("%s-%d", name, o))
			ok := t.Run(fmt.Sprintf("%s/%d", name, o), func(t *testing.T) {
				p := filepath.Join(dir, "relay.db")
				if err := os.MkdirAll(p+walExt, 0o700); err != nil {
					t.Fatal(err)
				}
				writeSparse(t, p, dbFile)
				for name, data := range finals {
					if name != seg {
						writeSegment(t, filepath.Join(p+walExt, name), bytes.TrimRight(data, "\x00"), len(data))
					}
				}
				writeSegment(t, filepath.Join(p+walExt, seg), torn.data, torn.size)
				checkTornStore(t, p, clock, evs[:earlier], evs[earlier:], intact(torn, final, from, ends[earlier:]), targets)
			})
			os.RemoveAll(dir)
			if !ok {
				return
			}
		}
	}
}

func walTestEventOf(t *testing.T, id ID) *Event {
	t.Helper()
	body := walTestEventBody(id)
	if body == nil {
		t.Fatalf("record of event %q", id[:])
	}
	return &Event{ID: id, ReceivedAt: walTestEventTime(id), ContentType: "application/json", Body: body}
}

func walTestEventTime(id ID) time.Time {
	n, _ := strconv.Atoi(strings.TrimLeft(strings.TrimPrefix(string(id[:]), "event-"), "0"))
	return walTestEvent(n).ReceivedAt
}

// checkTornStore opens the store at path, whose last group was torn, and
// checks it holds every earlier event and, of the last group's, the
// first whole ones (their records intact) and none of the others.
func checkTornStore(t *testing.T, path string, clock *fakeClock, earlier, last []*Event, whole int, targets []string) {
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatalf("OpenBolt: %v", err)
	}
	defer s.Close()
	waitLoaded(t, s)
	want := map[ID]bool{}
	for _, ev := range earlier {
		checkStored(t, s, ev, targets...)
		want[ev.ID] = true
	}
	for i, ev := range last {
		if i < whole {
			checkStored(t, s, ev, targets...)
			want[ev.ID] = true
		} else {
			checkAbsent(t, s, ev)
		}
	}
	c := checkCounts(t, s)
	if c.PendingEvents != len(want) {
		t.Errorf("%d events pending, want %d", c.PendingEvents, len(want))
	}
	for _, target := range targets {
		if n := c.Targets[target].Pending; n != len(want) {
			t.Errorf("%d pending at %s, want %d", n, target, len(want))
		}
		if got := takeIDs(t, mustQueue(t, s, target), len(want)); !maps.Equal(got, want) {
			t.Errorf("taken at %s: %v, want %v", target, got, want)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wantFormat(t, path, formatVersion)
}

// TestBoltOpensFormat1Release opens testdata/v1-relay.db.gz, written by
// the release before the log (format 1), received from 2026-12-01
// 12:00:00 UTC plus n seconds for event n: events 1-4 pending at o, 1, 2
// and 4 with order key k (in that order), 3 without; at a, 1-3 delivered
// and 4 dead (400). Everything is there, the keyed deliveries keep their
// order, a new keyed event goes behind them, the file says format 2 while
// open and 1 after a clean Close.
func TestBoltOpensFormat1Release(t *testing.T) {
	dir := t.TempDir()
	path := unzipFixture(t, "v1-relay.db", dir)
	if v := readFormat(t, path); binary.BigEndian.Uint32(v) != 1 {
		t.Fatalf("fixture's format %x, want 1", v)
	}
	recv := func(n int) time.Time { return time.Date(2026, 12, 1, 12, 0, n, 0, time.UTC) }
	clock := newFakeClock(recv(10))
	s := openTestBolt(t, path, clock.Now)
	waitLoaded(t, s)
	ctx := context.Background()
	c := checkCounts(t, s)
	if c.PendingEvents != 4 || c.Targets["o"].Pending != 4 || c.Targets["a"].Dead != 1 || c.Targets["a"].Pending != 0 {
		t.Errorf("Counts = %+v", c)
	}
	if v := readFormatOpen(t, s); v != formatLogged {
		t.Errorf("format while open %d, want %d", v, formatLogged)
	}
	for n := 1; n <= 4; n++ {
		if seen, err := s.Seen(ctx, testID(n), recv(10)); err != nil || !seen {
			t.Errorf("Seen(%d) = %v, %v", n, seen, err)
		}
	}
	if _, err := s.Accept(ctx, testEvent(5, recv(5)), []string{"o"}, AcceptOptions{OrderKeys: []string{"k"}}); err != nil {
		t.Fatal(err)
	}
	q, err := s.Queue("o", QueueOptions{Ordered: true})
	if err != nil {
		t.Fatal(err)
	}
	// Unkeyed 3 comes as it falls due; k's line is 1, 2, 4, then 5.
	var order []ID
	for len(order) < 5 {
		l := takeWithin(t, q, 5*time.Second)
		order = append(order, l.Delivery().ID)
		ev, n := l.Event(), 0
		for i := 1; i <= 5; i++ {
			if ev.ID == testID(i) {
				n = i
			}
		}
		if want := fmt.Sprintf(`{"n":%d}`, n); n == 0 || string(ev.Body) != want {
			t.Errorf("event %s body %q, want %s", ev.ID, ev.Body, want)
		}
		settleNow(t, l, Delivered, &Delivery{Attempts: 1})
	}
	var keyed []ID
	for _, id := range order {
		if id != testID(3) {
			keyed = append(keyed, id)
		}
	}
	if want := []ID{testID(1), testID(2), testID(4), testID(5)}; !slices.Equal(keyed, want) {
		t.Errorf("keyed deliveries in order %v, want %v", keyed, want)
	}
	dl, _, err := s.DeadLetters(ctx, "a", "", 10)
	if err != nil || len(dl) != 1 || dl[0].ID != testID(4) || dl[0].LastStatus != 400 {
		t.Errorf("DeadLetters = %+v, %v", dl, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if v := readFormat(t, path); binary.BigEndian.Uint32(v) != 1 {
		t.Errorf("format after a clean Close %x, want 1", v)
	}
}

// readFormatOpen reads the format key of an open store.
func readFormatOpen(t *testing.T, s *Bolt) uint32 {
	t.Helper()
	var v uint32
	if err := s.view(func(tx *bolt.Tx) error {
		v = binary.BigEndian.Uint32(tx.Bucket(bucketMeta).Get(keyFormat))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestBoltCloseWithAcceptsQueued: Close while thousands of Accepts are
// queued for the log (more than its queue holds) returns, every Accept
// returns, and every one acked is in the file at the next open.
func TestBoltCloseWithAcceptsQueued(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	clock := newFakeClock(testT0)
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	const n = 3 * maxBatch
	acked := make([]bool, n)
	var nacked atomic.Int64
	var wg sync.WaitGroup
	started := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-started
			_, err := s.Accept(context.Background(), testEvent(i, testT0), []string{"a"}, AcceptOptions{KeyExpiry: testT0.Add(time.Hour)})
			switch {
			case err == nil:
				acked[i] = true
				nacked.Add(1)
			case !errors.Is(err, ErrClosed):
				t.Errorf("Accept %d: %v", i, err)
			}
		}()
	}
	close(started)
	// Close once acks flow, with the log's queue full behind them.
	for nacked.Load() < 64 {
		runtime.Gosched()
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return with Accepts queued")
	}
	wg.Wait()
	s = reopenBolt(t, path, clock.Now)
	want := 0
	for i, ok := range acked {
		if !ok {
			continue
		}
		want++
		if seen, err := s.Seen(context.Background(), testID(i), testT0); err != nil || !seen {
			t.Errorf("acked event %d not in the file after Close: %v, %v", i, seen, err)
		}
	}
	if c := checkCounts(t, s); c.PendingEvents != want {
		t.Errorf("%d pending after reopen, %d acked", c.PendingEvents, want)
	}
}

package store

import (
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func openTestBolt(t testing.TB, path string, now func() time.Time) *Bolt {
	t.Helper()
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func waitLoaded(t testing.TB, s *Bolt) {
	t.Helper()
	select {
	case <-s.Loaded():
	case <-time.After(30 * time.Second):
		t.Fatal("backlog never loaded")
	}
}

// checkCounts compares Counts, kept in memory, with Stats, counted afresh
// from the file.
func checkCounts(t testing.TB, s *Bolt) Counts {
	t.Helper()
	c, err := s.Counts(context.Background())
	if err != nil {
		t.Fatalf("Counts: %v", err)
	}
	st, err := s.Stats(time.Time{})
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if c.PendingEvents != st.PendingEvents {
		t.Errorf("Counts.PendingEvents = %d, file has %d", c.PendingEvents, st.PendingEvents)
	}
	for name, tc := range c.Targets {
		if tc.Pending != st.Pending[name] || tc.Dead != st.Dead[name] {
			t.Errorf("Counts at %s: %d pending, %d dead; file has %d, %d", name, tc.Pending, tc.Dead, st.Pending[name], st.Dead[name])
		}
		if (tc.Pending > 0) != !tc.OldestPending.IsZero() {
			t.Errorf("Counts at %s: %d pending, the oldest received %v", name, tc.Pending, tc.OldestPending)
		}
	}
	for name, n := range st.Pending {
		if c.Targets[name].Pending != n {
			t.Errorf("file has %d pending at %s, Counts %d", n, name, c.Targets[name].Pending)
		}
	}
	for name, n := range st.Dead {
		if c.Targets[name].Dead != n {
			t.Errorf("file has %d dead at %s, Counts %d", n, name, c.Targets[name].Dead)
		}
	}
	return c
}

func pendingOf(t testing.TB, s *Bolt) []Delivery {
	t.Helper()
	var out []Delivery
	if err := s.Pending(func(d *Delivery) error { out = append(out, *d); return nil }); err != nil {
		t.Fatalf("Pending: %v", err)
	}
	return out
}

func TestBoltReopen(t *testing.T) {
	clock := newFakeClock(testT0)
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	mustAccept(t, s, testEvent(1, testT0), "a", "b")
	mustAccept(t, s, testEvent(2, testT0.Add(time.Second)), "a")
	ctx := context.Background()
	if _, err := s.SetState(ctx, "order", "k", []byte("v1"), 0, testT0.Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	qa, qb := mustQueue(t, s, "a"), mustQueue(t, s, "b")
	clock.Set(testT0.Add(time.Second))
	for range 2 {
		l := takeWithin(t, qa, 5*time.Second)
		d := l.Delivery()
		if d.ID == testID(1) {
			d.Attempts, d.NextAt, d.FirstAttemptAt, d.LastAttemptAt = 7, testT0.Add(time.Hour), testT0, testT0.Add(time.Minute)
			d.LastStatus, d.LastError = 503, "503 Service Unavailable"
			settleNow(t, l, Retry, &d)
		} else {
			settleNow(t, l, Delivered, &d)
		}
	}
	l := takeWithin(t, qb, 5*time.Second)
	settleNow(t, l, Dead, &Delivery{Attempts: 1, LastStatus: 422, LastError: "422: nope"})
	checkCounts(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openTestBolt(t, path, clock.Now)
	waitLoaded(t, s)
	p := pendingOf(t, s)
	if len(p) != 1 {
		t.Fatalf("Pending after reopen = %+v, want event 1 at a", p)
	}
	if d := p[0]; d.ID != testID(1) || d.Target != "a" || d.Attempts != 7 || !d.NextAt.Equal(testT0.Add(time.Hour)) ||
		!d.FirstAttemptAt.Equal(testT0) || d.LastStatus != 503 || d.LastError != "503 Service Unavailable" || !d.ReceivedAt.Equal(testT0) {
		t.Errorf("pending after reopen = %+v", d)
	}
	qa = mustQueue(t, s, "a")
	noTake(t, qa)
	clock.Set(testT0.Add(time.Hour))
	s.Wake()
	if d := takeWithin(t, qa, 5*time.Second).Delivery(); d.ID != testID(1) || d.Attempts != 7 || !d.FirstAttemptAt.Equal(testT0) {
		t.Errorf("taken after reopen: %+v", d)
	}
	dl, _, err := s.DeadLetters(ctx, "", "", 10)
	if err != nil || len(dl) != 1 || dl[0].ID != testID(1) || dl[0].Target != "b" || dl[0].LastStatus != 422 || dl[0].LastError != "422: nope" || string(dl[0].Body) != `{"n":1}` {
		t.Errorf("dead letters after reopen = %+v, %v", dl, err)
	}
	for _, n := range []int{1, 2} {
		if dup, err := s.Accept(ctx, testEvent(n, testT0.Add(time.Minute)), []string{"a"}, AcceptOptions{KeyExpiry: testT0.Add(2 * time.Hour)}); err != nil || !dup {
			t.Errorf("Accept(%d) after reopen = %v, %v; want duplicate", n, dup, err)
		}
	}
	if v, rev, err := s.State(ctx, "order", "k", testT0.Add(time.Hour-time.Second)); err != nil || string(v) != "v1" || rev == 0 {
		t.Errorf("State after reopen = %q, %d, %v", v, rev, err)
	} else if rev2, err := s.SetState(ctx, "order", "k", []byte("v2"), rev, testT0.Add(3*time.Hour)); err != nil || rev2 <= rev {
		t.Errorf("SetState after reopen = %d, %v; want a revision above %d", rev2, err, rev)
	}
	c := checkCounts(t, s)
	if c.PendingEvents != 1 || c.Targets["a"].Pending != 1 || c.Targets["b"].Dead != 1 || !c.Targets["a"].OldestPending.Equal(testT0) {
		t.Errorf("Counts after reopen = %+v", c)
	}
	if st, _ := s.Stats(time.Time{}); st.Keys != 2 {
		t.Errorf("Stats.Keys after reopen = %d, want 2", st.Keys)
	}
}

// unzipFixture writes the gzipped bbolt file at testdata/name.gz to dir.
func unzipFixture(t *testing.T, name, dir string) string {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", name+".gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, zr); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func readFormat(t *testing.T, path string) []byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v []byte
	err = db.View(func(tx *bolt.Tx) error {
		if m := tx.Bucket(bucketMeta); m != nil {
			v = append([]byte(nil), m.Get(keyFormat)...)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestBoltOpensPreviousRelease opens testdata/v0-relay.db.gz, a file the
// release before format versions wrote (gzipped: bbolt grows a file in
// 16 MiB steps). It holds, received from 2024-05-01 12:00:00 UTC plus n
// seconds for event n: events 1-3 pending at a and b, event 2 at a after
// 2 attempts (last 503, next in 2030); events 4 and 5 dead at a (last
// status 400+n); dedupe keys without events 6 (expiring 2099) and 7
// (2001); every other key expiring in 2099.
func TestBoltOpensPreviousRelease(t *testing.T) {
	path := unzipFixture(t, "v0-relay.db", t.TempDir())
	if v := readFormat(t, path); v != nil {
		t.Fatalf("fixture already has a format key: %x", v)
	}
	recv := func(n int) time.Time { return time.Date(2024, 5, 1, 12, 0, n, 0, time.UTC) }
	retryAt := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	clock := newFakeClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
	s := openTestBolt(t, path, clock.Now)
	waitLoaded(t, s)
	ctx := context.Background()

	c := checkCounts(t, s)
	if c.PendingEvents != 3 || c.Targets["a"].Pending != 3 || c.Targets["a"].Dead != 2 || c.Targets["b"].Pending != 3 ||
		!c.Targets["a"].OldestPending.Equal(recv(1)) || !c.Targets["b"].OldestPending.Equal(recv(1)) {
		t.Errorf("Counts = %+v", c)
	}
	qa, qb := mustQueue(t, s, "a"), mustQueue(t, s, "b")
	for n := 1; n <= 3; n++ {
		l := takeWithin(t, qb, 5*time.Second)
		if d := l.Delivery(); d.ID != testID(n) || d.Attempts != 0 || !d.ReceivedAt.Equal(recv(n)) {
			t.Errorf("take %d at b = %+v", n, d)
		}
		if ev := l.Event(); ev.ID != testID(n) || ev.ContentType != "application/json" || string(ev.Body) != fmt.Sprintf(`{"n":%d}`, n) || !ev.ReceivedAt.Equal(recv(n)) {
			t.Errorf("event %d = %+v (%q)", n, ev, ev.Body)
		}
	}
	for _, n := range []int{1, 3} {
		if d := takeWithin(t, qa, 5*time.Second).Delivery(); d.ID != testID(n) {
			t.Errorf("take at a = %s, want %s", d.ID, testID(n))
		}
	}
	noTake(t, qa) // event 2 is due in 2030
	clock.Set(retryAt)
	s.Wake()
	l := takeWithin(t, qa, 5*time.Second)
	if d := l.Delivery(); d.ID != testID(2) || d.Attempts != 2 || !d.FirstAttemptAt.Equal(recv(60)) || !d.NextAt.Equal(retryAt) {
		t.Errorf("retried delivery = %+v", d)
	}
	var retried Delivery
	if err := s.Pending(func(d *Delivery) error {
		if d.Target == "a" && d.ID == testID(2) {
			retried = *d
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if retried.LastStatus != 503 || retried.LastError != "503 Service Unavailable: try later" || !retried.LastAttemptAt.Equal(recv(120)) {
		t.Errorf("retried delivery on file = %+v", retried)
	}

	dl, next, err := s.DeadLetters(ctx, "a", "", 10)
	if err != nil || len(dl) != 2 || next != "" {
		t.Fatalf("DeadLetters = %+v, %q, %v", dl, next, err)
	}
	for i, d := range dl {
		n := 4 + i
		if d.ID != testID(n) || d.Attempts != 1 || d.LastStatus != 400+n || d.LastError != fmt.Sprintf("%d rejected %d", 400+n, n) ||
			string(d.Body) != fmt.Sprintf(`{"n":%d}`, n) || !d.ReceivedAt.Equal(recv(n)) {
			t.Errorf("dead letter %d = %+v (%q)", n, d.Delivery, d.Body)
		}
	}
	for n, want := range map[int]bool{1: true, 2: true, 3: true, 4: true, 5: true, 6: true, 7: false, 8: false} {
		if seen, err := s.Seen(ctx, testID(n), clock.Now()); err != nil || seen != want {
			t.Errorf("Seen(%d) = %v, %v; want %v", n, seen, err, want)
		}
	}
	// Writes go on in the old layout.
	settleNow(t, l, Delivered, &Delivery{Attempts: 3})
	mustAccept(t, s, testEvent(8, retryAt), "b")
	if n, err := s.ExpireKeys(ctx, retryAt); err != nil || n != 1 {
		t.Errorf("ExpireKeys = %d, %v; want key 7", n, err)
	}
	checkCounts(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if v := readFormat(t, path); len(v) != 4 || binary.BigEndian.Uint32(v) != 1 {
		t.Errorf("format key after open = %x, want 00000001", v)
	}
}

func TestBoltRefusesNewerFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyFormat, []byte{0, 0, 0, 3}) }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s, err = OpenBolt(path, BoltOptions{Timeout: time.Second})
	if err == nil {
		s.Close()
		t.Fatal("OpenBolt of a format 3 file succeeded")
	}
	if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "format 3") || !strings.Contains(msg, "newer") {
		t.Errorf("error %q does not name the file and say its format is newer", msg)
	}
	// Nothing was written: the file is still the newer relay's.
	if v := readFormat(t, path); binary.BigEndian.Uint32(v) != 3 {
		t.Errorf("format key after the refused open = %x", v)
	}
}

// TestBoltCountsPendingEventsOnce: a file without the pending-event count
// (written before the count existed) gets it, counted, at open.
func TestBoltCountsPendingEventsOnce(t *testing.T) {
	clock := newFakeClock(testT0)
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	for n := range 5 {
		targets := []string{"a", "b"}
		if n%2 == 0 {
			targets = targets[1:]
		}
		mustAccept(t, s, testEvent(n, testT0), targets...)
	}
	// Event 1 delivered at a (b still owes it), event 2 at b (settled).
	for _, tt := range []struct {
		target string
		n      int
	}{{"a", 1}, {"b", 2}} {
		q := mustQueue(t, s, tt.target)
		for {
			l := takeWithin(t, q, 5*time.Second)
			if l.Delivery().ID == testID(tt.n) {
				settleNow(t, l, Delivered, &Delivery{})
				break
			}
			l.Postpone(testT0.Add(time.Hour))
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keyPendingEvents) }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s = openTestBolt(t, path, clock.Now)
	waitLoaded(t, s)
	c := checkCounts(t, s)
	if c.PendingEvents != 4 || c.Targets["a"].Pending != 1 || c.Targets["b"].Pending != 4 {
		t.Errorf("Counts = %+v, want 4 events pending, 1 at a, 4 at b", c)
	}
}

// TestBoltCloseWritesFreelist: commits leave bbolt's freelist unwritten
// (the next open would rebuild it by reading every page), Close writes it.
// Read off the meta page bbolt uses, the one with the higher txid.
func TestBoltCloseWritesFreelist(t *testing.T) {
	clock := newFakeClock(testT0)
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	q := mustQueue(t, s, "a")
	for n := range 50 {
		mustAccept(t, s, testEvent(n, testT0), "a")
		settleNow(t, takeWithin(t, q, 5*time.Second), Delivered, &Delivery{})
	}
	const noFreelist = ^uint64(0)
	freelist := func() uint64 {
		f, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// page header 16 bytes, then magic, version, page size, flags (4
		// each), root bucket (16), freelist pgid, pgid, txid (8 each).
		pageSize := int(binary.LittleEndian.Uint32(f[16+8:]))
		var best, txid uint64
		for _, off := range []int{0, pageSize} {
			m := f[off+16:]
			if tx := binary.LittleEndian.Uint64(m[48:]); tx >= txid {
				txid, best = tx, binary.LittleEndian.Uint64(m[32:])
			}
		}
		return best
	}
	if got := freelist(); got != noFreelist {
		t.Errorf("freelist page %d after commits, want none written", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := freelist(); got == noFreelist {
		t.Error("no freelist written at Close: the next open reads the whole file")
	}
}

func TestBoltOpenTwiceFails(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.db")
	s := openTestBolt(t, path, nil)
	start := time.Now()
	s2, err := OpenBolt(path, BoltOptions{Timeout: 100 * time.Millisecond})
	if err == nil {
		s2.Close()
		t.Fatal("second OpenBolt of an open file succeeded")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("second OpenBolt took %s: it should give up after its timeout", took)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "locked") {
		t.Errorf("error %q does not name the file and say it is locked", err)
	}
	if s.Path() != path {
		t.Errorf("Path() = %q, want %q", s.Path(), path)
	}
}

func TestBoltOpenBadPath(t *testing.T) {
	dir := t.TempDir()
	// A directory where the file should be.
	if _, err := OpenBolt(dir, BoltOptions{Timeout: 100 * time.Millisecond}); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("OpenBolt(a directory) error = %v, want one naming it", err)
	}
}

// TestBoltFailedWriteSparesItsBatch: a write that fails on its own account
// fails alone; the writes committed in the same group still land.
func TestBoltFailedWriteSparesItsBatch(t *testing.T) {
	s := openTestBolt(t, filepath.Join(t.TempDir(), "relay.db"), func() time.Time { return testT0 })
	const n = 64
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			targets := []string{"a"}
			if i%8 == 0 {
				targets = []string{""} // bbolt refuses an empty bucket name
			}
			_, errs[i] = s.Accept(context.Background(), testEvent(i, testT0), targets, AcceptOptions{KeyExpiry: testT0.Add(time.Hour)})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		bad := i%8 == 0
		if (err != nil) != bad {
			t.Errorf("Accept %d: error %v, want failure %v", i, err, bad)
		}
		seen, _ := s.Seen(context.Background(), testID(i), testT0)
		if seen == bad {
			t.Errorf("Accept %d: stored %v, want %v", i, seen, !bad)
		}
	}
	c := checkCounts(t, s)
	if c.PendingEvents != n-n/8 || c.Targets["a"].Pending != n-n/8 || len(c.Targets) != 1 {
		t.Errorf("Counts = %+v, want %d pending at a", c, n-n/8)
	}
}

// TestBoltAckNeverWaitsForHeldOutcomes: outcomes nobody waits for wait
// for company (here an hour); an ack does not wait for them (it goes to
// the log, not to the file's writer), and the next write somebody waits
// for takes them along at once: by the time it returns, their callbacks
// have run.
func TestBoltAckNeverWaitsForHeldOutcomes(t *testing.T) {
	clock := newFakeClock(testT0)
	s := openTestBolt(t, filepath.Join(t.TempDir(), "relay.db"), clock.Now)
	mustAccept(t, s, testEvent(1, testT0), "a", "b")
	mustAccept(t, s, testEvent(2, testT0), "a")
	qa := mustQueue(t, s, "a")
	leases := map[ID]Lease{}
	for range 2 {
		l := takeWithin(t, qa, 5*time.Second)
		leases[l.Delivery().ID] = l
	}
	s.settleDelay = time.Hour
	got := make(chan error, 2)
	then := func(err error) { got <- err }
	leases[testID(1)].Settle(Retry, &Delivery{Attempts: 1, NextAt: testT0.Add(time.Minute)}, then)
	leases[testID(2)].Settle(Delivered, &Delivery{Attempts: 1}, then)
	acked := make(chan error, 1)
	go func() {
		_, err := s.Accept(context.Background(), testEvent(3, testT0), []string{"b"}, AcceptOptions{KeyExpiry: testT0.Add(time.Hour)})
		acked <- err
	}()
	select {
	case err := <-acked:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the ack waited for the outcomes' delay")
	}
	if _, err := s.SetState(context.Background(), "test", "k", []byte("v"), 0, testT0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if n := len(got); n != 2 {
		t.Fatalf("%d of 2 outcomes reported when a write after them returned", n)
	}
	for range 2 {
		if err := <-got; err != nil {
			t.Error(err)
		}
	}
	c := checkCounts(t, s)
	if c.PendingEvents != 2 || c.Targets["a"].Pending != 1 || c.Targets["b"].Pending != 2 {
		t.Errorf("Counts = %+v", c)
	}
	clock.Set(testT0.Add(time.Minute))
	s.Wake()
	if d := takeWithin(t, qa, 5*time.Second).Delivery(); d.ID != testID(1) || d.Attempts != 1 {
		t.Errorf("retried delivery = %+v", d)
	}
}

// fillBolt stores n events received at testT0 + i ns, pending at targets.
func fillBolt(t testing.TB, s *Bolt, from, n int, targets ...string) {
	t.Helper()
	// Many writers, so that group commits make few fsyncs.
	const writers = 64
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := from + w; i < from+n; i += writers {
				ev := testEvent(i, testT0.Add(time.Duration(i)))
				if _, err := s.Accept(context.Background(), ev, targets, AcceptOptions{KeyExpiry: testT0.Add(time.Hour)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// takeAll takes from q until nothing is due, counting each delivery.
func takeAll(t testing.TB, q Queue, settle bool) map[ID]int {
	t.Helper()
	got := map[ID]int{}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		l, err := q.Take(ctx)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			return got
		}
		if err != nil {
			t.Fatalf("Take: %v", err)
		}
		got[l.Delivery().ID]++
		if settle {
			settleNow(t, l, Delivered, &Delivery{})
		}
	}
}

func checkOnce(t testing.TB, got map[ID]int, want int) {
	t.Helper()
	if len(got) != want {
		t.Errorf("took %d deliveries, want %d", len(got), want)
	}
	for id, n := range got {
		if n != 1 {
			t.Errorf("took %s %d times", id, n)
		}
	}
}

// TestBoltBacklogLoad: what was pending when the store closed is queued
// again after it opens, each delivery once.
func TestBoltBacklogLoad(t *testing.T) {
	clock := newFakeClock(testT0.Add(time.Second))
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	fillBolt(t, s, 0, 1000, "a")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTestBolt(t, path, clock.Now)
	waitLoaded(t, s)
	if c := checkCounts(t, s); c.Targets["a"].Pending != 1000 || c.PendingEvents != 1000 {
		t.Errorf("Counts after the load = %+v", c)
	}
	checkOnce(t, takeAll(t, mustQueue(t, s, "a"), false), 1000)
}

// TestBoltWritesDuringLoad: a store takes writes while its backlog loads,
// and what they queue is queued once: accepts, settles of loaded
// deliveries, a retirement (whose target's backlog still to come is
// dropped) and a replay.
func TestBoltWritesDuringLoad(t *testing.T) {
	clock := newFakeClock(testT0.Add(time.Second))
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	const backlog = loadBatch + 500 // two batches at a, then b's
	fillBolt(t, s, 0, backlog, "a", "b")
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
	<-reached // a's first batch is queued, the rest of a and all of b not yet
	ctx := context.Background()
	if c, _ := s.Counts(ctx); c.Targets["a"].Pending != loadBatch || c.Targets["b"].Pending != 0 || c.PendingEvents != backlog {
		t.Errorf("Counts mid-load = %+v", c)
	}
	fillBolt(t, s, backlog, 10, "a", "b")
	qa := mustQueue(t, s, "a")
	first := takeWithin(t, qa, 5*time.Second)
	settleNow(t, first, Delivered, &Delivery{})
	moved, err := s.Retire(ctx, "b", "target removed")
	if err != nil || moved != backlog+10 {
		t.Fatalf("Retire(b) = %d, %v; want %d", moved, err, backlog+10)
	}
	close(gate)
	waitLoaded(t, s)
	c := checkCounts(t, s)
	if c.Targets["a"].Pending != backlog+9 || c.Targets["b"].Pending != 0 || c.Targets["b"].Dead != backlog+10 {
		t.Errorf("Counts after the load = %+v", c)
	}
	got := takeAll(t, qa, false)
	checkOnce(t, got, backlog+9)
	if got[first.Delivery().ID] != 0 {
		t.Error("the delivery settled during the load was queued again")
	}
	if n, err := s.Replay(ctx, nil, "b", nil); err != nil || n != backlog+10 {
		t.Fatalf("Replay(b) = %d, %v", n, err)
	}
	if n, err := s.Replay(ctx, nil, "b", nil); err != nil || n != 0 {
		t.Errorf("second Replay(b) = %d, %v; want nothing", n, err)
	}
	checkOnce(t, takeAll(t, mustQueue(t, s, "b"), false), backlog+10)
	checkCounts(t, s)
}

// TestBoltCloseDuringLoad: Close cuts a backlog load short, and the file
// keeps everything pending.
func TestBoltCloseDuringLoad(t *testing.T) {
	clock := newFakeClock(testT0)
	path := filepath.Join(t.TempDir(), "relay.db")
	s, err := OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	const backlog = 3 * loadBatch
	fillBolt(t, s, 0, backlog, "a")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var batches atomic.Int32
	closed := make(chan error, 1)
	var b *Bolt
	opened := make(chan struct{})
	b, err = OpenBolt(path, BoltOptions{Timeout: time.Second, Now: clock.Now, afterBatch: func() {
		if batches.Add(1) != 1 {
			return
		}
		<-opened
		go func() { closed <- b.Close() }()
		<-b.quit // Close has begun, and waits for the load
	}})
	if err != nil {
		t.Fatal(err)
	}
	close(opened)
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close during the load never returned")
	}
	if n := batches.Load(); n >= 3 {
		t.Errorf("the load went on for %d batches after Close", n)
	}
	s = openTestBolt(t, path, clock.Now)
	if st, err := s.Stats(time.Time{}); err != nil || st.Pending["a"] != backlog {
		t.Errorf("after Close during the load: %+v, %v; want %d pending", st, err, backlog)
	}
}

// TestBoltMaxPending: the limit counts what is pending and what is being
// accepted; a duplicate is one even when full.
func TestBoltMaxPending(t *testing.T) {
	s := openTestBolt(t, filepath.Join(t.TempDir(), "relay.db"), func() time.Time { return testT0 })
	ctx := context.Background()
	opts := AcceptOptions{KeyExpiry: testT0.Add(time.Hour), MaxPending: 10}
	var wg sync.WaitGroup
	var accepted, full atomic.Int32
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Accept(ctx, testEvent(i, testT0), []string{"a"}, opts)
			switch {
			case err == nil:
				accepted.Add(1)
			case errors.Is(err, ErrFull):
				full.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if accepted.Load() != 10 || full.Load() != 30 {
		t.Errorf("%d accepted, %d full; want 10, 30", accepted.Load(), full.Load())
	}
	if c := checkCounts(t, s); c.PendingEvents != 10 {
		t.Errorf("Counts.PendingEvents = %d", c.PendingEvents)
	}
	// Without targets there is nothing to be full of.
	if _, err := s.Accept(ctx, testEvent(100, testT0), nil, opts); err != nil {
		t.Errorf("Accept without targets when full: %v", err)
	}
	for i := range 40 {
		seen, _ := s.Seen(ctx, testID(i), testT0)
		if !seen {
			continue
		}
		if dup, err := s.Accept(ctx, testEvent(i, testT0), []string{"a"}, opts); err != nil || !dup {
			t.Errorf("Accept of stored event %d when full = %v, %v; want duplicate", i, dup, err)
		}
	}
}

// TestBoltExpireKeysSweepsStates: expired key states leave the file with
// the keys.
func TestBoltExpireKeysSweepsStates(t *testing.T) {
	s := openTestBolt(t, filepath.Join(t.TempDir(), "relay.db"), func() time.Time { return testT0 })
	ctx := context.Background()
	for i := range 3 {
		if _, err := s.SetState(ctx, "order", fmt.Sprint(i), []byte("x"), 0, testT0.Add(time.Duration(i+1)*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	// Rewritten with a later expiry: its first expiry sweeps nothing.
	_, rev, err := s.State(ctx, "order", "0", testT0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetState(ctx, "order", "0", []byte("y"), rev, testT0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ExpireKeys(ctx, testT0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	var states, exps int
	err = s.view(func(tx *bolt.Tx) error {
		states, exps = tx.Bucket(bucketState).Stats().KeyN, tx.Bucket(bucketStateExp).Stats().KeyN
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if states != 2 || exps != 2 {
		t.Errorf("after the sweep: %d states, %d expiry entries; want 2, 2", states, exps)
	}
	if v, _, err := s.State(ctx, "order", "0", testT0.Add(2*time.Minute)); err != nil || string(v) != "y" {
		t.Errorf("rewritten state = %q, %v", v, err)
	}
	if _, _, err := s.State(ctx, "order", "1", testT0); !errors.Is(err, ErrNotFound) {
		t.Errorf("swept state: %v, want ErrNotFound", err)
	}
	if _, err := s.SetState(ctx, "or\x00der", "k", nil, 0, time.Time{}); err == nil {
		t.Error("a space with a NUL in it accepted")
	}
}

func benchmarkAcceptParallel(b *testing.B, s Store) {
	b.Helper()
	var next atomic.Int64
	body := []byte(`{"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K2","api_version":"v3","data":{"status":"verified"}}`)
	targets := []string{"legacy"}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			n := next.Add(1)
			ev := &Event{ID: testID(int(n)), ReceivedAt: testT0, ContentType: "application/json", Body: body}
			if dup, err := s.Accept(context.Background(), ev, targets, AcceptOptions{KeyExpiry: testT0.Add(time.Hour)}); err != nil || dup {
				b.Errorf("Accept = %v, %v", dup, err)
				return
			}
		}
	})
}

// BenchmarkBoltAcceptParallel measures the durable ack path: concurrent
// Accepts of distinct events, each fsynced, group-committed.
func BenchmarkBoltAcceptParallel(b *testing.B) {
	s, err := OpenBolt(filepath.Join(b.TempDir(), "relay.db"), BoltOptions{Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	benchmarkAcceptParallel(b, s)
}

// TestBoltLogApplyTakesHeldOutcomes: an outcome waiting for company
// (here an hour) goes with the commit that applies the log once the log
// holds enough: its callback runs without waiting out the delay.
func TestBoltLogApplyTakesHeldOutcomes(t *testing.T) {
	s := openTestBolt(t, filepath.Join(t.TempDir(), "relay.db"), newFakeClock(testT0).Now)
	mustAccept(t, s, testEvent(1, testT0), "a")
	l := takeWithin(t, mustQueue(t, s, "a"), 5*time.Second)
	s.settleDelay = time.Hour
	got := make(chan error, 1)
	l.Settle(Delivered, &Delivery{Attempts: 1}, func(err error) { got <- err })
	// Once the writer has it, it waits for company.
	for deadline := time.Now().Add(5 * time.Second); len(s.ops) > 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the writer did not take the outcome")
		}
	}
	s.kick(true) // what an Accept does once the log holds applyBytes
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the outcome waited out its delay past a commit that applied the log")
	}
	if c := checkCounts(t, s); c.PendingEvents != 0 || c.Targets["a"].Pending != 0 {
		t.Errorf("Counts = %+v, want nothing pending", c)
	}
}

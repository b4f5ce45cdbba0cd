package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// walPayload is a record's payload of size bytes (at least 16), told
// apart by n.
func walPayload(n, size int) []byte {
	p := fmt.Appendf(nil, "record %06d:", n)
	for len(p) < size {
		p = append(p, byte('a'+n%26))
	}
	return p[:size]
}

// testLogID is the id of the tests' logs.
const testLogID = 0x5eed

func openTestWAL(t *testing.T, dir string, segSize int64, applied uint64) (*walLog, []walRecord) {
	t.Helper()
	w, recs, err := openWAL(dir, testLogID, segSize, applied)
	if err != nil {
		t.Fatalf("openWAL: %v", err)
	}
	// A second close of a file closed already only returns an error.
	t.Cleanup(func() { _ = w.closeFiles() })
	return w, recs
}

func mustAppend(t *testing.T, w *walLog, payloads ...[]byte) uint64 {
	t.Helper()
	last, err := w.appendGroup(payloads)
	if err != nil {
		t.Fatalf("appendGroup: %v", err)
	}
	return last
}

// checkRecords checks that recs are the records from..to, in order, with
// the payloads sent.
func checkRecords(t *testing.T, recs []walRecord, sent map[uint64][]byte, from, to uint64) {
	t.Helper()
	if want := int(to + 1 - from); len(recs) != want {
		t.Fatalf("%d records returned, want %d (%d to %d)", len(recs), want, from, to)
	}
	for i, r := range recs {
		if want := from + uint64(i); r.seq != want {
			t.Fatalf("record %d has seq %d, want %d", i, r.seq, want)
		}
		if !bytes.Equal(r.payload, sent[r.seq]) {
			t.Fatalf("record %d: payload %.40q, want %.40q", r.seq, r.payload, sent[r.seq])
		}
	}
}

func segmentFiles(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*"+walExt))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func segName(dir string, n int) string {
	return filepath.Join(dir, fmt.Sprintf("%08d%s", n, walExt))
}

// TestWALReopenReturnsGroupsInOrder: what was logged comes back after a
// reopen, in order with its seqs, from the first record not applied; and
// the seqs go on from there.
func TestWALReopenReturnsGroupsInOrder(t *testing.T) {
	dir := t.TempDir()
	w, recs := openTestWAL(t, dir, 0, 0)
	if len(recs) != 0 {
		t.Fatalf("a new log returned %d records", len(recs))
	}
	sent := map[uint64][]byte{}
	var seq uint64
	for g, n := range []int{1, 3, 2, 5} {
		var ps [][]byte
		for range n {
			seq++
			sent[seq] = walPayload(int(seq), 20+int(seq))
			ps = append(ps, sent[seq])
		}
		if last := mustAppend(t, w, ps...); last != seq {
			t.Fatalf("group %d: last seq %d, want %d", g, last, seq)
		}
	}
	if err := w.closeFiles(); err != nil {
		t.Fatal(err)
	}
	for _, applied := range []uint64{0, 1, 4, 10, 11} {
		w, recs := openTestWAL(t, dir, 0, applied)
		checkRecords(t, recs, sent, applied+1, 11)
		if w.next != 12 {
			t.Errorf("applied %d: the next record would be %d, want 12", applied, w.next)
		}
		w.closeFiles()
	}
	// A run that applied everything writes over the segment, its seqs
	// going on from the last.
	w, _ = openTestWAL(t, dir, 0, 11)
	sent[12] = walPayload(12, 30)
	if last := mustAppend(t, w, sent[12]); last != 12 {
		t.Fatalf("first record after the reopen has seq %d, want 12", last)
	}
	w.closeFiles()
	_, recs = openTestWAL(t, dir, 0, 11)
	checkRecords(t, recs, sent, 12, 12)
	if n := len(segmentFiles(t, dir)); n != 1 {
		t.Errorf("%d segments, want the one written over", n)
	}
}

// TestWALReusesReleasedSegments: with releases following the appends
// (as the writer's applies do) the log writes over its segments rather
// than making new ones, and a reopen returns exactly the records not
// applied: nothing left from an earlier use of a segment, in this run or
// the one before.
func TestWALReusesReleasedSegments(t *testing.T) {
	const segSize = 4096
	dir := t.TempDir()
	sent := map[uint64][]byte{}
	var seq, applied uint64
	// Two records of 500 bytes a group: three groups a segment. Each
	// release lags two groups behind.
	run := func(w *walLog, groups int) {
		t.Helper()
		for g := range groups {
			var ps [][]byte
			for range 2 {
				seq++
				sent[seq] = walPayload(int(seq), 500)
				ps = append(ps, sent[seq])
			}
			if last := mustAppend(t, w, ps...); last != seq {
				t.Fatalf("group %d: last seq %d, want %d", g, last, seq)
			}
			if seq > 4 {
				applied = seq - 4
				w.release(applied)
			}
		}
		// The records of two groups wait, in one or two segments, with
		// one more free at most.
		names := segmentFiles(t, dir)
		if len(names) > 3 {
			t.Errorf("%d segments after %d groups: segments not written over", len(names), groups)
		}
		for _, name := range names {
			if fi, err := os.Stat(name); err != nil || fi.Size() > segSize {
				t.Errorf("segment %s: %v, want at most %d bytes", name, fi.Size(), segSize)
			}
		}
		if w.made > 3 {
			t.Errorf("%d segments made for two groups' records", w.made)
		}
	}
	w, _ := openTestWAL(t, dir, segSize, 0)
	run(w, 40) // 80 records, some 40 KiB: ten segments' worth
	w.closeFiles()
	for _, a := range []uint64{applied, seq - 1, seq} {
		w, recs := openTestWAL(t, dir, segSize, a)
		checkRecords(t, recs, sent, a+1, seq)
		w.closeFiles()
	}
	// The next run replays the unapplied, releases them, and writes over
	// the same segments with new generations.
	w, recs := openTestWAL(t, dir, segSize, applied)
	checkRecords(t, recs, sent, applied+1, seq)
	w.release(seq)
	run(w, 20)
	w.closeFiles()
	_, recs = openTestWAL(t, dir, segSize, applied)
	checkRecords(t, recs, sent, applied+1, seq)
}

// TestWALOversizeGroup: a group larger than a segment gets a segment of
// its own, read back whole after a reopen, never written over by other
// groups, and removed once applied.
func TestWALOversizeGroup(t *testing.T) {
	const segSize = 4096
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, segSize, 0)
	sent := map[uint64][]byte{
		1: walPayload(1, 100),
		2: walPayload(2, 3*segSize),
		3: walPayload(3, 1<<20), // too large for what 2's segment has left
		4: walPayload(4, 100),
	}
	for seq := uint64(1); seq <= 4; seq++ {
		if last := mustAppend(t, w, sent[seq]); last != seq {
			t.Fatalf("seq %d returned as %d", seq, last)
		}
		if seq == 1 {
			for _, s := range w.segs {
				if s.oversize || s.size != segSize {
					t.Errorf("after a group of 100 bytes: segment %s of %d bytes, oversize %v", filepath.Base(s.path), s.size, s.oversize)
				}
			}
		}
	}
	if n := len(segmentFiles(t, dir)); n != 3 {
		t.Fatalf("%d segments for a small group, two oversize and a small one after, want 3", n)
	}
	fi, err := os.Stat(segName(dir, 1))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() <= segSize {
		t.Fatalf("the oversize group's segment has %d bytes", fi.Size())
	}
	// Applied through 2: 2's segment goes (3's is the one being
	// written); the first, of the usual size, stays to be written over.
	w.release(1)
	if n := len(segmentFiles(t, dir)); n != 3 {
		t.Fatalf("%d segments after a release of the first group, want 3", n)
	}
	w.release(2)
	if _, err := os.Stat(segName(dir, 1)); !os.IsNotExist(err) {
		t.Errorf("oversize segment after its release: %v, want removed", err)
	}
	if _, err := os.Stat(segName(dir, 0)); err != nil {
		t.Errorf("a segment of the usual size after its release: %v, want kept to write over", err)
	}
	w.closeFiles()

	w, recs := openTestWAL(t, dir, segSize, 2)
	checkRecords(t, recs, sent, 3, 4)
	w.release(4)
	if _, err := os.Stat(segName(dir, 2)); !os.IsNotExist(err) {
		t.Errorf("oversize segment of the last run after its release: %v, want removed", err)
	}
	sent[5] = walPayload(5, 100)
	mustAppend(t, w, sent[5])
	w.closeFiles()
	_, recs = openTestWAL(t, dir, segSize, 4)
	checkRecords(t, recs, sent, 5, 5)
	names := segmentFiles(t, dir)
	if len(names) != 1 {
		t.Errorf("segments %v after every oversize group is applied, want the first alone", names)
	}
	for _, name := range names {
		if fi, err := os.Stat(name); err != nil || fi.Size() > segSize {
			t.Errorf("segment %s left after every oversize group is applied", name)
		}
	}
}

// segmentRecords returns the valid records of a segment's contents, of
// log id.
func segmentRecords(t *testing.T, data []byte, id uint64) []walRecord {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "seg")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	_, recs, err := readSegment(f, int64(len(data)), id)
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// recordEnds returns where each record of a segment's valid chain ends.
func recordEnds(t *testing.T, data []byte) []int {
	t.Helper()
	recs := segmentRecords(t, data, testLogID)
	var ends []int
	off := walHeaderLen
	for _, r := range recs {
		off += walRecHeadLen + len(r.payload)
		ends = append(ends, off)
	}
	return ends
}

// writeSegment writes data to a new file at path, grown to size bytes
// with a hole: a segment is megabytes of zeros past its records.
func writeSegment(t *testing.T, path string, data []byte, size int) {
	t.Helper()
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
}

// tornSegment is a segment whose last write was torn at o: final's bytes
// before o, and past it what the variant says was there. before is what
// the segment held ahead of that write, its trailing zeros cut; size is
// the segment's size.
type tornSegment struct {
	data []byte
	size int
}

// intact returns how many of the records ending at ends, from start, the
// torn segment holds as final has them: past a tear, what was there may
// happen to be what the write would have put there.
func intact(torn tornSegment, final []byte, start int, ends []int) int {
	at := func(data []byte, size, i int) (byte, bool) {
		switch {
		case i < len(data):
			return data[i], true
		case i < size:
			return 0, true
		}
		return 0, false
	}
	n := 0
	for _, end := range ends {
		for i := start; i < end; i++ {
			b, ok := at(torn.data, torn.size, i)
			if want, _ := at(final, end, i); !ok || b != want {
				return n
			}
		}
		n++
		start = end
	}
	return n
}

// tornVariants are what a segment holds at and past the offset where a
// write was torn: what was there before (an earlier use's records), zeros
// (the segment's own, or its size grew and the data did not arrive), or
// nothing (its size did not grow either).
func tornVariants(final, before []byte, size, o int) map[string]tornSegment {
	old := append([]byte(nil), final[:o]...)
	if o < len(before) {
		old = append(old, before[o:]...)
	}
	return map[string]tornSegment{
		"old":   {old, size},
		"zeros": {final[:o:o], size},
		"short": {final[:o:o], o},
	}
}

// TestWALTornGroupAtEveryOffset: the last group, written over records a
// run before left (of the same sizes, so they line up), torn at every
// byte: a reopen returns every record before it and, of the group, the
// records wholly written: never a record of the earlier run.
func TestWALTornGroupAtEveryOffset(t *testing.T) {
	// Small segments: each open reads its segments whole.
	const segSize = 64 << 10
	dir := t.TempDir()
	sent := map[uint64][]byte{}
	// The run before: ten records, all applied.
	w, _ := openTestWAL(t, dir, segSize, 0)
	for seq := uint64(1); seq <= 10; seq++ {
		sent[seq] = walPayload(int(seq), 40)
		mustAppend(t, w, sent[seq])
	}
	w.closeFiles()
	olds := readSegments(t, dir)
	// This run: three groups of one, then a group of three, over a
	// segment from its start.
	w, _ = openTestWAL(t, dir, segSize, 10)
	for seq := uint64(11); seq <= 13; seq++ {
		sent[seq] = walPayload(int(seq), 40)
		mustAppend(t, w, sent[seq])
	}
	for seq := uint64(14); seq <= 16; seq++ {
		sent[seq] = walPayload(int(seq), 40)
	}
	mustAppend(t, w, sent[14], sent[15], sent[16])
	w.closeFiles()
	finals := readSegments(t, dir)
	var name string
	for n, data := range finals {
		if r := chainOf(t, data); len(r) > 0 && r[len(r)-1].seq == 16 {
			name = n
		}
	}
	if name == "" {
		t.Fatal("no segment holds this run's records")
	}
	seg := filepath.Join(dir, name)
	final := finals[name]
	ends := recordEnds(t, final)
	if len(ends) != 6 {
		t.Fatalf("the segment's chain has %d records, want 6", len(ends))
	}
	start, end := ends[2], ends[5]
	size := len(final)
	old := bytes.TrimRight(olds[name], "\x00")
	final = bytes.TrimRight(final, "\x00")
	if len(old) < end {
		// The design writes over the segment the run before used;
		// if it does not, the old bytes are zeros.
		t.Logf("the earlier run's %d bytes in %s do not lie under the last group (%d to %d)", len(old), name, start, end)
	}
	// Before the last group's write: this run's first groups over the
	// earlier run's records.
	before := append([]byte(nil), final[:start]...)
	if len(old) > start {
		before = append(before, old[start:]...)
	}
	for o := start; o <= end; o++ {
		for variant, torn := range tornVariants(final, before, size, o) {
			writeSegment(t, seg, torn.data, torn.size)
			w, recs, err := openWAL(dir, testLogID, segSize, 10)
			if err != nil {
				t.Fatalf("torn at %d (%s): openWAL: %v", o, variant, err)
			}
			w.closeFiles()
			whole := uint64(13 + intact(torn, final, start, ends[3:]))
			if len(recs) != int(whole-10) {
				t.Fatalf("torn at %d (%s): %d records returned, want %d", o, variant, len(recs), whole-10)
			}
			checkRecords(t, recs, sent, 11, whole)
			if w.next != whole+1 {
				t.Fatalf("torn at %d (%s): next seq %d, want %d", o, variant, w.next, whole+1)
			}
		}
	}
}

// TestWALOldRunRecordBeyondTearNeverReturned: a run's torn group left
// records past the tear (the disk wrote a later block and not an earlier
// one); the next run writes over the segment, and its next record would
// go exactly where one of those lies, with the very seq that one has.
// Only the generation tells them apart: it is never returned.
func TestWALOldRunRecordBeyondTearNeverReturned(t *testing.T) {
	const p = 40
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, 0, 0)
	for n := 1; n <= 6; n++ {
		mustAppend(t, w, walPayload(n, p))
	}
	mustAppend(t, w, walPayload(7, p), walPayload(8, p), walPayload(9, p))
	w.closeFiles()
	// The segment holding them is the only one left, for the next run
	// to write over: the others hold nothing.
	var seg string
	var data []byte
	for name, d := range readSegments(t, dir) {
		if r := chainOf(t, d); len(r) == 9 {
			seg, data = filepath.Join(dir, name), d
		} else if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if seg == "" {
		t.Fatal("no segment holds the nine records")
	}
	// Record 7 torn, 8 and 9 on disk.
	rec := walRecHeadLen + p
	data[walHeaderLen+6*rec+walRecHeadLen] ^= 0xff
	writeSegment(t, seg, data, len(data))
	w, recs := openTestWAL(t, dir, 0, 6)
	if len(recs) != 0 {
		t.Fatalf("%d records returned past the torn one", len(recs))
	}
	// The next run's record 7 ends where the last run's 8 begins.
	sent := map[uint64][]byte{7: walPayload(70, 7*rec-walRecHeadLen)}
	if last := mustAppend(t, w, sent[7]); last != 7 {
		t.Fatalf("the next run's first seq is %d, want 7", last)
	}
	w.closeFiles()
	data, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	at := walHeaderLen + 7*rec
	if got := binary.LittleEndian.Uint64(data[at+8:]); got != 8 || !bytes.Equal(data[:4], []byte(walMagic)) {
		t.Fatalf("the test is off: the next run did not write over the segment (the record after its 7 has seq %d)", got)
	}
	_, recs = openTestWAL(t, dir, 0, 6)
	checkRecords(t, recs, sent, 7, 7)
}

// TestWALReleaseSparesSegmentJustTaken: appendGroup takes a segment and
// then writes the group; a release in between (the writer's, after an
// apply) must not take a new oversize segment, holding nothing yet, for
// one to remove.
func TestWALReleaseSparesSegmentJustTaken(t *testing.T) {
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, 1<<20, 0)
	mustAppend(t, w, walPayload(1, 100))
	w.release(1)
	// What appendGroup does first for a group of 2 MiB.
	seg, err := w.take(walHeaderLen + walRecHeadLen + 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	w.release(1)
	if _, err := os.Stat(seg.path); err != nil {
		t.Fatalf("the segment just taken for a group, after a release: %v", err)
	}
	if _, err := seg.f.Stat(); err != nil {
		t.Fatalf("the segment just taken for a group, after a release: %v", err)
	}
}

// TestWALFailedWriteLosesNoAckedRecord: a group whose write fails in the
// segment it was to begin (here: a segment written over, its file
// refusing writes for the one group) is not acked; a group acked after
// it is returned by the next open.
func TestWALFailedWriteLosesNoAckedRecord(t *testing.T) {
	const segSize = 1 << 20
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, segSize, 0)
	big := 600 << 10
	mustAppend(t, w, walPayload(1, big)) // segment 0
	mustAppend(t, w, walPayload(2, big)) // segment 1
	w.release(2)
	// The next group goes over a segment written before: none takes a
	// write.
	type swapped struct {
		s      *walSegment
		rw, ro *os.File
	}
	var sw []swapped
	for _, s := range w.segs {
		if s == w.cur {
			continue
		}
		ro, err := os.Open(s.path)
		if err != nil {
			t.Fatal(err)
		}
		sw = append(sw, swapped{s, s.f, ro})
		s.f = ro
	}
	_, err := w.appendGroup([][]byte{walPayload(3, big)})
	for _, x := range sw {
		x.s.f = x.rw
		x.ro.Close()
	}
	if err == nil {
		t.Fatal("the test is off: the group went to a new segment, not over one written before")
	}
	small := walPayload(4, 100)
	last, err := w.appendGroup([][]byte{small})
	w.closeFiles()
	if err != nil {
		// Refusing every group after a failed one is safe too.
		t.Logf("the group after a failed one: %v", err)
		return
	}
	_, recs := openTestWAL(t, dir, segSize, 2)
	checkRecords(t, recs, map[uint64][]byte{last: small}, last, last)
}

// TestWALFailedSyncKeepsTheGroupOut: a group whose fdatasync fails may be
// in the file all the same. The next group gets its seqs; when it is a
// shorter one (here: the same events but the last, sent again), what is
// left of the failed group after it must not be returned as records.
func TestWALFailedSyncKeepsTheGroupOut(t *testing.T) {
	dir := t.TempDir()
	w, _ := openTestWAL(t, dir, 0, 0)
	sent := map[uint64][]byte{}
	first := walPayload(1, 100)
	sent[mustAppend(t, w, first)] = first
	a, b, c := walPayload(2, 100), walPayload(3, 100), walPayload(4, 100)
	syncLog = func(*os.File) error { return errors.New("injected: sync failed") }
	_, err := w.appendGroup([][]byte{a, b, c})
	syncLog = fdatasync
	if err == nil {
		t.Fatal("appendGroup with a failing sync: no error")
	}
	last := mustAppend(t, w, a, b)
	sent[last-1], sent[last] = a, b
	if err := w.closeFiles(); err != nil {
		t.Fatal(err)
	}
	_, recs := openTestWAL(t, dir, 0, 0)
	checkRecords(t, recs, sent, 1, last)
}

package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// The write-ahead log of the ack path. An ack waits for one write and one
// fdatasync of its group in the log, never for a bbolt commit (two
// fdatasyncs, and tree work): the writer applies logged records to bbolt
// behind the acks, in large batches, with bbolt's commits synced as
// before. Opening replays what the last run logged and did not apply.
//
// The log is a set of segment files, each written from its start with a
// header then records. A segment whose records are all applied is
// written over from its start. Segments are filled with zeros when made:
// writing into blocks a file already has leaves fdatasync nothing of the
// file's own to flush, while appending changes its size, which costs a
// journal commit each time. On a disk without room for the zeros a
// segment grows as it is written instead: a relay on a small volume must
// not fail for space it may never use.
//
// Each time a segment is taken up its header gets the next generation of
// the log, and every record's checksum covers it, so nothing left from
// an earlier use reads as a record of this one. Where two segments hold
// the same seq (a group whose write failed, then written again in another
// segment), the later generation's record is the one acked. The header
// also names the log's file (an id kept in the file's meta): a log left
// beside a new file is not replayed into it.
//
// Segment layout:
//
//	header: magic "RWAL" | version u32 | log id u64 | generation u64 | first seq u64 | crc32c u32
//	record: length u32 | crc32c u32 (of generation, seq, payload) | seq u64 | payload
//
// A record is valid if its length fits the segment, its seq follows the
// one before it (the header's first seq for the first) and its checksum
// matches. Reading a segment stops at the first record that is not: a
// group torn by a crash loses only records that were never acked, since
// an ack waits for its group's fdatasync.

const (
	walMagic      = "RWAL"
	walVersion    = 1
	walHeaderLen  = 4 + 4 + 8 + 8 + 8 + 4
	walRecHeadLen = 4 + 4 + 8
	// walSegmentSize is the size of a segment: enough for a burst of a
	// few thousand events between two applies.
	walSegmentSize = 4 << 20
	walExt         = ".wal"
)

var walTable = crc32.MakeTable(crc32.Castagnoli)

const walBusy = ^uint64(0)

// walRecord is one logged record, as read back.
type walRecord struct {
	seq     uint64
	gen     uint64 // of the segment use that holds it
	payload []byte
}

type walSegment struct {
	f    *os.File
	path string
	size int64 // what it may hold: the file grows up to it
	// last is the highest seq the segment holds in this use; 0 while it
	// holds nothing that is still to be applied; walBusy from when the
	// writer takes it up until its first group is written, so that no
	// release frees it meanwhile.
	last uint64
	// oversize: made for one group larger than a segment; removed once
	// applied rather than written over.
	oversize bool
}

// walLog appends groups of records and recycles segments once applied.
// appendGroup is called by one goroutine at a time; release by another.
type walLog struct {
	dir     string
	segSize int64
	id      uint64

	mu      sync.Mutex // segs, each segment's last, applied
	segs    []*walSegment
	applied uint64

	cur *walSegment // written by the writer under mu, read by release

	// The writer's own.
	gen   uint64 // of cur's use
	fresh bool   // cur has no header of this use yet
	off   int64
	next  uint64 // seq of the next record
	buf   []byte
	made  int // segments made so far, for their names
}

// openWAL opens the log id in dir, making it if need be, and returns the
// records after applied, in order: the caller applies them, then calls
// release. Segments of another log are taken for empty. segSize 0 is
// walSegmentSize.
func openWAL(dir string, id uint64, segSize int64, applied uint64) (*walLog, []walRecord, error) {
	if segSize <= 0 {
		segSize = walSegmentSize
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("creating log directory: %w", err)
	}
	w := &walLog{dir: dir, segSize: segSize, id: id, applied: applied, next: applied + 1}
	names, err := filepath.Glob(filepath.Join(dir, "*"+walExt))
	if err != nil {
		return nil, nil, err
	}
	slices.Sort(names)
	bySeq := map[uint64]walRecord{}
	for _, name := range names {
		f, err := os.OpenFile(name, os.O_RDWR, 0)
		if err != nil {
			w.closeFiles()
			return nil, nil, fmt.Errorf("opening log segment: %w", err)
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			w.closeFiles()
			return nil, nil, fmt.Errorf("opening log segment: %w", err)
		}
		seg := &walSegment{f: f, path: name, size: max(segSize, fi.Size()), oversize: fi.Size() > segSize}
		w.segs = append(w.segs, seg)
		gen, recs, err := readSegment(f, fi.Size(), id)
		if err != nil {
			w.closeFiles()
			return nil, nil, fmt.Errorf("reading log segment %s: %w", name, err)
		}
		w.gen = max(w.gen, gen)
		for _, r := range recs {
			if r.seq <= applied {
				continue
			}
			seg.last = max(seg.last, r.seq)
			if old, ok := bySeq[r.seq]; !ok || r.gen > old.gen {
				bySeq[r.seq] = r
			}
		}
		w.made = max(w.made, segmentNumber(name)+1)
	}
	// The records to replay run on from applied; a record past a gap
	// was never acked (its group was torn before its fdatasync ended).
	var out []walRecord
	// Acked records rise in generation with their seqs: one of an older
	// generation after a newer one is what remains of a group whose
	// write failed and was written again elsewhere, shorter.
	for seq, gen := applied+1, uint64(0); ; seq++ {
		r, ok := bySeq[seq]
		if !ok || r.gen < gen {
			break
		}
		gen = r.gen
		out = append(out, r)
	}
	w.next = applied + 1 + uint64(len(out))
	if len(w.segs) == 0 {
		// The first segment now rather than with the first ack: free
		// for it to take.
		seg, err := w.makeSegment(segSize)
		if err != nil {
			return nil, nil, err
		}
		seg.last = 0
	}
	return w, out, nil
}

func segmentNumber(path string) int {
	var n int
	_, _ = fmt.Sscanf(strings.TrimSuffix(filepath.Base(path), walExt), "%d", &n)
	return n
}

// readSegment returns the valid records of a segment of log id, from its
// start, and the generation of its use.
func readSegment(f *os.File, size int64, id uint64) (uint64, []walRecord, error) {
	if size < walHeaderLen {
		return 0, nil, nil
	}
	data := make([]byte, size)
	if _, err := f.ReadAt(data, 0); err != nil && !errors.Is(err, io.EOF) {
		return 0, nil, err
	}
	h := data[:walHeaderLen]
	if string(h[:4]) != walMagic || crc32.Checksum(h[:walHeaderLen-4], walTable) != binary.LittleEndian.Uint32(h[walHeaderLen-4:]) {
		return 0, nil, nil // never written, or its header torn: nothing acked
	}
	if v := binary.LittleEndian.Uint32(h[4:]); v != walVersion {
		return 0, nil, fmt.Errorf("log format %d, this relay reads %d", v, walVersion)
	}
	if binary.LittleEndian.Uint64(h[8:]) != id {
		return 0, nil, nil // another file's log: nothing of this one
	}
	gen := binary.LittleEndian.Uint64(h[16:])
	want := binary.LittleEndian.Uint64(h[24:])
	var out []walRecord
	off := int64(walHeaderLen)
	for off+walRecHeadLen <= size {
		n := int64(binary.LittleEndian.Uint32(data[off:]))
		sum := binary.LittleEndian.Uint32(data[off+4:])
		seq := binary.LittleEndian.Uint64(data[off+8:])
		end := off + walRecHeadLen + n
		if seq != want || end > size {
			break
		}
		payload := data[off+walRecHeadLen : end]
		if recordSum(gen, seq, payload) != sum {
			break
		}
		out = append(out, walRecord{seq: seq, gen: gen, payload: payload})
		want++
		off = end
	}
	return gen, out, nil
}

func recordSum(gen, seq uint64, payload []byte) uint32 {
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:], gen)
	binary.LittleEndian.PutUint64(b[8:], seq)
	return crc32.Update(crc32.Checksum(b[:], walTable), walTable, payload)
}

// appendGroup logs payloads as consecutive records with one write and
// one fdatasync, and returns the seq of the last.
func (w *walLog) appendGroup(payloads [][]byte) (uint64, error) {
	need := int64(0)
	for _, p := range payloads {
		need += walRecHeadLen + int64(len(p))
	}
	buf := w.buf[:0]
	if w.cur == nil || w.off+need > w.cur.size {
		seg, err := w.take(walHeaderLen + need)
		if err != nil {
			return 0, err
		}
		w.mu.Lock()
		w.cur = seg
		w.mu.Unlock()
		w.off, w.fresh = 0, true
		w.gen++
	}
	start := w.off
	if w.fresh {
		// Until a group is written after it, as often as it takes.
		buf = binary.LittleEndian.AppendUint32(append(buf, walMagic...), walVersion)
		buf = binary.LittleEndian.AppendUint64(buf, w.id)
		buf = binary.LittleEndian.AppendUint64(buf, w.gen)
		buf = binary.LittleEndian.AppendUint64(buf, w.next)
		buf = binary.LittleEndian.AppendUint32(buf, crc32.Checksum(buf, walTable))
	}
	seq := w.next
	for _, p := range payloads {
		buf = binary.LittleEndian.AppendUint32(buf, uint32(len(p)))
		buf = binary.LittleEndian.AppendUint32(buf, recordSum(w.gen, seq, p))
		buf = binary.LittleEndian.AppendUint64(buf, seq)
		buf = append(buf, p...)
		seq++
	}
	w.buf = buf[:0]
	if _, err := w.cur.f.WriteAt(buf, start); err != nil {
		return 0, w.abandon(fmt.Errorf("writing the log: %w", err))
	}
	if err := syncLog(w.cur.f); err != nil {
		return 0, w.abandon(fmt.Errorf("syncing the log: %w", err))
	}
	last := seq - 1
	w.mu.Lock()
	w.cur.last = last
	w.mu.Unlock()
	w.off, w.fresh = start+int64(len(buf)), false
	w.next = seq
	return last, nil
}

// syncLog is fdatasync; tests make it fail.
var syncLog = fdatasync

// abandon ends the current segment's use after a group failed in it,
// and returns err. The group may be in the file all the same, whole or in
// part, with the seqs the next group gets: that one goes to another
// segment, a generation later, so that what is left of the failed group
// never reads as records that follow it (see the top).
func (w *walLog) abandon(err error) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cur.last == walBusy {
		w.cur.last = 0 // nothing acked in it: free to take again
	}
	w.cur = nil
	return err
}

// take returns a segment of at least need bytes holding nothing still to
// be applied, making one if there is none.
func (w *walLog) take(need int64) (*walSegment, error) {
	w.mu.Lock()
	for _, s := range w.segs {
		if s != w.cur && s.last <= w.applied && s.size >= need && !s.oversize {
			s.last = walBusy
			w.mu.Unlock()
			return s, nil
		}
	}
	w.mu.Unlock()
	size := w.segSize
	if need > size {
		// Oversize: its own, rounded up to a MiB.
		size = (need + 1<<20 - 1) &^ (1<<20 - 1)
	}
	return w.makeSegment(size)
}

// makeSegment adds a segment of size bytes, filled with zeros if the
// disk has room (writes into it then change no size: see the top), else
// left to grow as it is written.
func (w *walLog) makeSegment(size int64) (*walSegment, error) {
	path := filepath.Join(w.dir, fmt.Sprintf("%08d%s", w.made, walExt))
	w.made++
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("making a log segment: %w", err)
	}
	if size == w.segSize {
		zero := make([]byte, 1<<20)
		for off := int64(0); off < size; off += int64(len(zero)) {
			if _, err = f.WriteAt(zero[:min(int64(len(zero)), size-off)], off); err != nil {
				break
			}
		}
		if err == nil {
			err = fdatasync(f)
		}
		if err != nil {
			// No room for zeros: it grows as records come, as far as
			// the disk lets it.
			if err := f.Truncate(0); err != nil {
				f.Close()
				os.Remove(path)
				return nil, fmt.Errorf("making a log segment: %w", err)
			}
		}
	}
	// Its name must survive a crash with the records about to be
	// written in it.
	if err := syncDir(w.dir); err != nil {
		f.Close()
		return nil, fmt.Errorf("making a log segment: %w", err)
	}
	s := &walSegment{f: f, path: path, size: size, oversize: size != w.segSize, last: walBusy}
	w.mu.Lock()
	w.segs = append(w.segs, s)
	w.mu.Unlock()
	return s, nil
}

// release records that every record up to seq is applied: the segments
// holding only those may be written over, and an oversize one goes.
func (w *walLog) release(seq uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.applied = max(w.applied, seq)
	kept := w.segs[:0]
	for _, s := range w.segs {
		if s.oversize && s.last <= w.applied && s != w.cur {
			s.f.Close()
			os.Remove(s.path)
			continue
		}
		kept = append(kept, s)
	}
	w.segs = kept
}

func (w *walLog) closeFiles() error {
	var errs []error
	for _, s := range w.segs {
		errs = append(errs, s.f.Close())
	}
	return errors.Join(errs...)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

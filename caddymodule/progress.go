package caddymodule

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/term"
)

// isTerminal reports whether w is a terminal, where a live progress line
// can be redrawn; a pipe or a file gets none.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// progressEvery is how often simulate's progress line is redrawn.
const progressEvery = 200 * time.Millisecond

// showProgress redraws one line on w from s, under mu, until the returned
// stop is called, which erases the line so that the summary follows.
func showProgress(w io.Writer, total int, s *simSummary, mu *sync.Mutex) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	draw := func() {
		mu.Lock()
		line := fmt.Sprintf("events %d/%d, requests %d: accepted %d, duplicate %d, no answer %d, gave up %d",
			s.Events, total, s.Requests, s.Results["accepted"], s.Results["duplicate"], s.Errors, s.GaveUp)
		mu.Unlock()
		// \r and "erase line": the line is drawn over itself.
		fmt.Fprintf(w, "\r\x1b[K%s", line)
	}
	go func() {
		defer close(finished)
		tick := time.NewTicker(progressEvery)
		defer tick.Stop()
		for {
			draw()
			select {
			case <-done:
				fmt.Fprint(w, "\r\x1b[K")
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			<-finished
		})
	}
}

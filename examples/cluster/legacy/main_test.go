package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestServiceCounts pins what run.sh reads: a key answered 200 twice is a
// duplicate, a refused attempt is neither distinct nor duplicate.
func TestServiceCounts(t *testing.T) {
	refuse := false
	s := newService(func() bool { return refuse })
	post := func(key string) int {
		t.Helper()
		req := httptest.NewRequest(http.MethodPost, "/okhi", strings.NewReader(`{}`))
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		return rec.Code
	}
	steps := []struct {
		key    string
		refuse bool
		want   int
	}{
		{"a", true, http.StatusServiceUnavailable},
		{"a", false, http.StatusOK},
		{"b", false, http.StatusOK},
		{"a", false, http.StatusOK},
		{"", false, http.StatusBadRequest},
	}
	for i, st := range steps {
		refuse = st.refuse
		if got := post(st.key); got != st.want {
			t.Fatalf("step %d (key %q): status %d, want %d", i, st.key, got, st.want)
		}
	}

	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/stats", nil))
	var got stats
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatalf("decoding /stats %q: %v", rec.Body.String(), err)
	}
	want := stats{Requests: 5, Failed: 1, Distinct: 2, Duplicates: 1}
	if got != want {
		t.Errorf("stats %+v, want %+v", got, want)
	}
}

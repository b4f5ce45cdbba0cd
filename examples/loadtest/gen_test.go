package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"
)

func TestHistogramBuckets(t *testing.T) {
	for _, v := range []uint64{0, 1, 63, 64, 127, 128, 129, 255, 256, 1000, 123456, 1 << 30, 5e9, 1 << 40} {
		i := bucketOf(v)
		hi := uint64(bucketValue(i))
		if hi < v {
			t.Errorf("bucket %d of %d has upper bound %d below it", i, v, hi)
		}
		if v >= 128 && float64(hi-v) > float64(v)/60 {
			t.Errorf("bucket of %d is too wide: upper bound %d", v, hi)
		}
		if i > 0 && uint64(bucketValue(i-1)) >= v {
			t.Errorf("%d belongs below bucket %d", v, i)
		}
	}
}

func TestHistogramQuantile(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, time.Millisecond}} {
		got := h.quantile(c.q)
		if got < c.want || float64(got-c.want) > float64(c.want)/60 {
			t.Errorf("q%.2f = %s, want about %s", c.q, got, c.want)
		}
	}
}

func TestRequestIsValidHTTPAndResendIsExact(t *testing.T) {
	tpls := renderTemplates("127.0.0.1:1")
	first := bytes.Clone(request(tpls, 42))
	_ = request(tpls, 43)
	if again := request(tpls, 42); !bytes.Equal(first, again) {
		t.Fatalf("re-send differs:\n%s\n%s", first, again)
	}
	for id := range uint64(len(variants)) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(request(tpls, id))))
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(req.Body)
		if err != nil {
			t.Fatal(err)
		}
		var v struct {
			V2 map[string]any `json:"v2"`
		}
		if err := json.Unmarshal(body, &v); err != nil {
			t.Fatalf("body %s: %v", body, err)
		}
		if v.V2["address_verification_id"] == "" || req.Header.Get(authHeader) != authValue || req.Method != http.MethodPost {
			t.Errorf("unexpected request %+v %s", req.Header, body)
		}
	}
}

package shape

import (
	"context"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// The payloads of /work/shared/okhi-facts.md: what OkHi sends, with
// undocumented fields.
const (
	okhiV2 = `{"v2": {"address_verification_id": "ONYgUOybCU", "verification_status": "verified",
        "verification_mode": "first_time", "user_id": "hbZ69KMuYB", "location_id": "C0DTxgjRdn",
        "extra_undocumented": {"score": 0.91}}}`
	okhiV2InProgress = `{"v2": {"address_verification_id": "ONYgUOybCU", "verification_mode": "first_time", "user_id": "hbZ69KMuYB", "location_id": "C0DTxgjRdn"}}`
	okhiV3           = `{"event_type": "address_verification.completed", "event_id": "01HZ3QK7V6J8N2W4X5Y6Z7A8B9",
 "api_version": "v3", "event_timestamp": 1715677923, "undocumented_top": true,
 "data": {"usage_types": ["digital_verification"],
          "user": {"id": "hbZ69KMuYB", "first_name": "Gift", "last_name": "Moore", "phone": "+2347012345678"},
          "metadata": {"org_id": "iNjNabYBcK", "app_id": "NstCO4hXXX"},
          "location": {"id": "C0DTxgjRdn", "formatted_address": "12 Ojijo Rd, Nairobi"},
          "address_verification": {"id": "ONYgUOybCU", "status": "verified"},
          "undocumented_data": 1}}`
)

var (
	testReceived = time.Date(2024, 5, 14, 9, 12, 3, 456789000, time.FixedZone("EAT", 3*3600))
	testNow      = time.Unix(1715677999, 0)
)

const testURL = "http://127.0.0.1:9/hook"

func mustCompile(t testing.TB, s Spec) *Pipeline {
	t.Helper()
	if s.URL == "" {
		s.URL = testURL
	}
	p, err := Compile(s)
	if err != nil {
		t.Fatalf("Compile(%+v): %v", s, err)
	}
	return p
}

func input(body string) Input {
	return Input{ID: "evt_01", ReceivedAt: testReceived, ContentType: "application/json", Body: []byte(body)}
}

func build(t testing.TB, p *Pipeline, in Input) Request {
	t.Helper()
	r, err := p.Build(context.Background(), in, testNow)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return r
}

func buildErr(t testing.TB, p *Pipeline, in Input) string {
	t.Helper()
	r, err := p.Build(context.Background(), in, testNow)
	if err == nil {
		t.Fatalf("Build succeeded with body %q, want an error", r.Body)
	}
	return err.Error()
}

func header(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

package relay_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// An engine receives an OkHi event, stores it, acks at once, and delivers
// it in the background; the same event sent again is a duplicate.
func Example() {
	got := make(chan string, 1)
	legacy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		got <- fmt.Sprintf("%s attempt %s: %s", r.Header.Get("X-Webhook-Relay-Target"), r.Header.Get("X-Webhook-Relay-Attempt"), body)
	}))
	defer legacy.Close()

	e, err := relay.New(relay.Config{
		Targets: []relay.TargetConfig{{Name: "legacy", URL: legacy.URL}},
	}, relay.Options{
		// store.OpenBolt(path, store.BoltOptions{Timeout: time.Second}) for a durable store.
		OpenStore: func() (store.Store, error) { return store.NewMemory(store.MemoryOptions{}), nil },
	})
	if err != nil {
		panic(err)
	}
	if err := e.Open(); err != nil {
		panic(err)
	}
	defer e.Close()

	body := []byte(`{"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K2","api_version":"v3"}`)
	for range 2 {
		res, err := e.Receive(context.Background(), body, "application/json")
		if err != nil {
			panic(err) // relay.ErrFull or relay.ErrUnavailable: answer 503
		}
		fmt.Println("duplicate:", res.Duplicate)
	}
	fmt.Println(<-got)
	// Output:
	// duplicate: false
	// duplicate: true
	// legacy attempt 1: {"event_type":"address_verification.completed","event_id":"01HZX3Q9W4K2","api_version":"v3"}
}

package relay

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// Preview builds the request that target would get for an event with
// body and contentType received at now, as the engine's first attempt at
// now would send it, and sends nothing: the target's pipeline compiled as
// a config load compiles it, the contract's headers added (the event id
// derived as Receive derives it). Its errors are a config the engine
// would refuse, or the event's failure at the target (last_error of the
// dead letter it would become). Whether the event matches the target's
// match lines is TargetConfig.Matches.
func Preview(cfg Config, target string, body []byte, contentType string, now time.Time) (shape.Request, error) {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return shape.Request{}, err
	}
	var tc *TargetConfig
	names := make([]string, 0, len(cfg.Targets))
	for i := range cfg.Targets {
		names = append(names, cfg.Targets[i].Name)
		if cfg.Targets[i].Name == target {
			tc = &cfg.Targets[i]
		}
	}
	if tc == nil {
		return shape.Request{}, fmt.Errorf("relay %s has no target %q (its targets: %s)", cfg.Name, target, strings.Join(names, ", "))
	}
	p, err := shape.Compile(shapeSpec(&cfg, tc))
	if err != nil {
		return shape.Request{}, fmt.Errorf("target %s: %w", tc.Name, err)
	}
	// The transform runs under the attempt's timeout, as in the engine.
	ctx, cancel := context.WithTimeout(context.Background(), tc.Timeout)
	defer cancel()
	id := cfg.EventID(body)
	r, err := p.Build(ctx, shape.Input{ID: id.String(), ReceivedAt: now, ContentType: contentType, Body: body}, now)
	if err != nil {
		return shape.Request{}, err
	}
	r.Header = contractHeaders(r.Header, tc.Name, id, 1)
	return r, nil
}

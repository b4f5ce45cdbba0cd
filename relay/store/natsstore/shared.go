package natsstore

// Shared implements store.Sharer: every instance of a relay uses the same
// stream.
func (s *Store) Shared() bool { return true }

import Foundation
import HeraldStore
import ServiceLifecycle
import Synchronization

/// Whether the session an access token was issued with (its `sid`: the refresh-token family of a
/// login) is still live, asked on every request made with a user's token. A session ends at
/// logout, when a spent refresh token is used again (theft: the whole family is revoked) and when
/// the user is deactivated. Only the streams asked before, so the rest of the API kept honouring a
/// token of an ended session until it expired, up to 15 minutes, and a deactivated then
/// reactivated user's old token worked again (a trial).
///
/// A session found live is trusted for `seconds` (HERALD_SESSION_CHECK_SECONDS, 30 by default; 0
/// asks the database on every request), so a busy user's reads do not each ask the database. An
/// end is known at once: this instance marks the sessions it ends, and `SessionWatch` marks those
/// the database announces on the bus (any instance's, the same as the streams end on); a bus that
/// lost messages forgets every live answer. An ended session never comes back. Tokens without a
/// session (issued outside a login) have nothing to check.
public final class SessionLiveness: Sendable {
    static let capacity = 10_000
    let seconds: TimeInterval
    private let state = Mutex(State())

    private struct Key: Hashable {
        var session: UUID
        var userID: UUID
    }

    private struct State {
        /// The database's last answer for a session of a user, and when it was given.
        var answers: [Key: (live: Bool, at: Date)] = [:]
        /// Sessions known to have ended (this instance ended them, or the bus said so).
        var ended: Set<UUID> = []
    }

    init(seconds: TimeInterval) {
        self.seconds = seconds
    }

    /// Whether `access`'s session is live: the answer kept, or `check`'s (the database's), kept.
    func isLive(_ access: VerifiedAccess, now: Date, check: (UUID) async throws -> Bool) async throws -> Bool {
        guard let session = access.sessionID else { return true }
        let key = Key(session: session, userID: access.userID)
        let known: Bool? = state.withLock { state in
            if state.ended.contains(session) { return false }
            guard let answer = state.answers[key] else { return nil }
            if !answer.live { return false }
            let age = now.timeIntervalSince(answer.at)
            return age >= 0 && age < seconds ? true : nil
        }
        if let known { return known }
        let live = try await check(session)
        return state.withLock { state in
            // An end recorded while the check ran wins: a check never revives a session.
            if state.ended.contains(session) { return false }
            if state.answers.count >= Self.capacity { state.answers.removeAll(keepingCapacity: true) }
            state.answers[key] = (live, now)
            return live
        }
    }

    /// `session` ended (logout, a refresh token used twice, an announcement on the bus).
    func ended(session: UUID) {
        state.withLock { state in
            if state.ended.count >= Self.capacity { state.ended.removeAll(keepingCapacity: true) }
            state.ended.insert(session)
        }
    }

    /// Every session of `userID` ended (a deactivation revokes them all).
    func ended(user userID: UUID) {
        state.withLock { state in
            for key in state.answers.keys where key.userID == userID { state.answers[key]?.live = false }
        }
    }

    /// The bus may have lost an end: every live answer is asked again.
    func forgetLive() {
        state.withLock { state in state.answers = state.answers.filter { !$0.value.live } }
    }
}

/// Applies the bus's announcements of ended sessions and deactivated users to `SessionLiveness`,
/// so that every instance refuses such a token at once (the streams end on the same messages).
public struct SessionWatch: Service {
    let bus: NotificationBus
    let sessions: SessionLiveness

    public init(bus: NotificationBus, tokens: AccessTokens) {
        self.bus = bus
        self.sessions = tokens.sessions
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            let messages = bus.subscribe()
            // What ended before this subscription is asked of the database.
            sessions.forgetLive()
            for await message in messages {
                if Task.isCancelled { return }
                switch message {
                case .sessionRevoked(_, let session): sessions.ended(session: session)
                case .userDeactivated(_, let user): sessions.ended(user: user)
                case .missedMessages: sessions.forgetLive()
                case .eventCommitted, .feedChanged, .streamsAdvanced: break
                }
            }
        }
    }
}

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

    /// The database said the session is live, for a check that started `at`.
    private struct Answer {
        var userID: UUID
        var at: Date
    }

    private struct State {
        /// Sessions the database last said were live (a session is one user's).
        var answers: [UUID: Answer] = [:]
        /// Sessions known to have ended (this instance ended them, or the bus said so).
        var ended: Set<UUID> = []
        /// When each user's sessions were last ended all at once (a deactivation): an answer from
        /// a check that started before then is not trusted.
        var usersEnded: [UUID: Date] = [:]
    }

    init(seconds: TimeInterval) {
        self.seconds = seconds
    }

    /// Whether `access`'s session is live: the answer kept, or `check`'s (the database's), kept.
    func isLive(_ access: VerifiedAccess, now: Date, check: (UUID) async throws -> Bool) async throws -> Bool {
        guard let session = access.sessionID else { return true }
        let known: Bool? = state.withLock { state in
            if state.ended.contains(session) { return false }
            guard let answer = state.answers[session], answer.userID == access.userID else { return nil }
            if let ended = state.usersEnded[access.userID], answer.at <= ended { return nil }
            let age = now.timeIntervalSince(answer.at)
            return age >= 0 && age < seconds ? true : nil
        }
        if let known { return known }
        let live = try await check(session)
        return state.withLock { state in
            // An end recorded while the check ran wins: a check never revives a session.
            if state.ended.contains(session) { return false }
            // A deactivation recorded since the check started may or may not be in its answer:
            // the answer stands for this request and is not kept, so the next one asks again.
            if let ended = state.usersEnded[access.userID], ended >= now { return live }
            // A session found ended stays ended (its refresh tokens are revoked or expired).
            guard live else {
                Self.record(ended: session, in: &state)
                return false
            }
            if state.answers.count >= Self.capacity {
                // Answers past their time go first; then all of them.
                state.answers = state.answers.filter { now.timeIntervalSince($0.value.at) < seconds }
                if state.answers.count >= Self.capacity { state.answers.removeAll(keepingCapacity: true) }
            }
            state.answers[session] = Answer(userID: access.userID, at: now)
            return true
        }
    }

    private static func record(ended session: UUID, in state: inout State) {
        state.answers[session] = nil
        if state.ended.count >= capacity { state.ended.removeAll(keepingCapacity: true) }
        state.ended.insert(session)
    }

    /// `session` ended (logout, a refresh token used twice, an announcement on the bus).
    func ended(session: UUID) {
        state.withLock { state in Self.record(ended: session, in: &state) }
    }

    /// Every session of `userID` ended at `now` (a deactivation revokes them all): what was found
    /// live for them before is asked again. Nothing is refused for good here, so a deactivation
    /// whose transaction then fails costs only a check.
    func ended(user userID: UUID, now: Date) {
        state.withLock { state in
            if state.usersEnded.count >= Self.capacity { state.usersEnded.removeAll(keepingCapacity: true) }
            state.usersEnded[userID] = now
        }
    }

    /// The bus may have lost an end: every live answer is asked again.
    func forgetLive() {
        state.withLock { state in state.answers.removeAll() }
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
                case .userDeactivated(_, let user): sessions.ended(user: user, now: Date())
                case .missedMessages: sessions.forgetLive()
                case .eventCommitted, .feedChanged, .streamsAdvanced: break
                }
            }
        }
    }
}

extension APIError {
    /// The session a credential came from has ended: a 401 that tells the client to sign in again.
    static var sessionEnded: APIError { .unauthorized("The session behind this credential has ended; sign in again.") }
}

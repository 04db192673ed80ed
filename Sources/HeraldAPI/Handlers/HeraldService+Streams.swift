import Foundation
import HeraldCore
import HeraldStore

/// Stream tickets; the streams themselves are hand-written routes (`StreamRoutes`).
extension HeraldService {
    /// A single-use ticket for one live stream, bound to the caller and their session.
    func createStreamTicket(_ input: Operations.CreateStreamTicket.Input) async throws -> Operations.CreateStreamTicket.Output {
        let user = try requireUser()
        let session: UUID? =
            switch try RequestScope.get().credential {
            case .accessToken(let access): access.sessionID
            case .apiKey, nil: nil
            }
        let issued = now()
        let expires = issued.addingTimeInterval(streamTicketLifetime)
        let ticket = try await tenant { tx, _ in
            // A ticket a stream would refuse is not issued: the stream checks that the session
            // behind the credential is live (signed out, or ended with a deactivation), so the
            // ticket's request says so first, as the stream would.
            try await tx.requireLiveSession(session, of: user, now: issued)
            let ticket = OpaqueToken(kind: .streamTicket, organisationID: tx.organisationID)
            try await tx.createStreamTicket(
                id: ticket.id, userID: user, sessionID: session, secretHash: ticket.secretHash, expiresAt: expires)
            return ticket
        }
        let query = "?ticket=\(ticket.text)"
        return .created(
            .init(
                body: .json(
                    .init(
                        ticket: ticket.text, expiresAt: expires, streamUrl: StreamRoutes.streamPath + query,
                        socketUrl: StreamRoutes.socketPath + query))))
    }

    // The generated router never registers these two (`SkippingTransport`): `StreamRoutes`
    // serves them. Reaching one of these would be a wiring fault, hence a logged 500.
    func streamMyNotifications(_ input: Operations.StreamMyNotifications.Input) async throws -> Operations.StreamMyNotifications.Output {
        throw APIError.internalError
    }

    func openMyNotificationSocket(
        _ input: Operations.OpenMyNotificationSocket.Input
    ) async throws
        -> Operations.OpenMyNotificationSocket.Output
    {
        throw APIError.internalError
    }
}

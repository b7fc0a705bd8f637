//! A synthetic RTSP camera (H.264 + AAC) on loopback: for demos, for trying percept without a
//! camera, and for the reconnect tests, which stop, pause and restart it.

use gstreamer as gst;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum TestSrcError {
    #[error("GStreamer: {0}")]
    Gst(String),
    #[error("cannot serve RTSP on port {0}")]
    Attach(u16),
}

/// Launch line of the served stream: a moving pattern with a keyframe every second, and a tone.
pub fn launch_line(width: u32, height: u32, fps: u32) -> String {
    format!(
        "( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 \
         ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} bitrate=1000 \
         ! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 \
         audiotestsrc is-live=true wave=sine freq=440 volume=0.3 ! audioconvert ! audioresample \
         ! audio/x-raw,rate=16000,channels=1 ! avenc_aac ! rtpmp4gpay name=pay1 pt=97 )"
    )
}

/// Serve until the process is killed. `credentials` = (user, password) enables Basic auth.
pub fn serve_rtsp(
    port: u16,
    path: &str,
    credentials: Option<(String, String)>,
    size: (u32, u32, u32),
) -> Result<(), TestSrcError> {
    gst::init().map_err(|e| TestSrcError::Gst(e.to_string()))?;
    let main_loop = gst::glib::MainLoop::new(None, false);
    let server = rtsp::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port.to_string());
    let mounts = server
        .mount_points()
        .ok_or_else(|| TestSrcError::Gst("no mount points".into()))?;
    let factory = rtsp::RTSPMediaFactory::new();
    factory.set_launch(&launch_line(size.0, size.1, size.2));
    factory.set_shared(true);
    if let Some((user, password)) = credentials {
        let auth = rtsp::RTSPAuth::new();
        let token = rtsp::RTSPToken::builder()
            .field(rtsp::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
            .build();
        let basic = rtsp::RTSPAuth::make_basic(&user, &password);
        auth.add_basic(basic.as_str(), &token);
        server.set_auth(Some(&auth));
        let role = gst::Structure::builder("user")
            .field(rtsp::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
            .field(rtsp::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
            .build();
        factory.add_role_from_structure(&role);
    }
    mounts.add_factory(path, factory);
    let _id = server
        .attach(None)
        .map_err(|_| TestSrcError::Attach(port))?;
    tracing::info!(port, path, "Serving test RTSP stream.");
    main_loop.run();
    Ok(())
}

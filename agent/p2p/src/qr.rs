//! QR onboarding (SPEC.md section 8): the pairing token as a QR code, drawn with block
//! characters on the console and saved as a PNG; and the decoder `register` uses.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use qrcode::render::unicode::Dense1x2;
use qrcode::{Color, QrCode};

/// Pixels per module in the PNG: large enough for a phone camera or a screenshot.
const SCALE: usize = 8;
/// The quiet zone QR readers need around the code, in modules.
const QUIET: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("the token does not fit in a QR code: {0}")]
    Encode(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding PNG {path}: {msg}")]
    PngEncode { path: PathBuf, msg: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a PNG image this decoder reads: {msg}")]
    PngDecode { path: PathBuf, msg: String },
    #[error("no QR code found in {0}")]
    NotFound(PathBuf),
    #[error("the QR code in {path} does not decode: {msg}")]
    Decode { path: PathBuf, msg: String },
}

fn code(data: &str) -> Result<QrCode, QrError> {
    QrCode::new(data.as_bytes()).map_err(|e| QrError::Encode(e.to_string()))
}

/// The code as text, two modules per character cell (upper and lower half blocks), dark on
/// light with the quiet zone, for a console.
pub fn render_text(data: &str) -> Result<String, QrError> {
    Ok(code(data)?
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Dark)
        .light_color(Dense1x2::Light)
        .quiet_zone(true)
        .build())
}

/// Write the code as an 8-bit greyscale PNG.
pub fn write_png(data: &str, path: &Path) -> Result<(), QrError> {
    let qr = code(data)?;
    let w = qr.width();
    let colors = qr.to_colors();
    let side = (w + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != Color::Dark {
            continue;
        }
        let (mx, my) = (i % w + QUIET, i / w + QUIET);
        for y in my * SCALE..(my + 1) * SCALE {
            pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
        }
    }
    let werr = |source| QrError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    // The picture is the token: readable by root only.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|f| {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                Ok(f)
            })
            .map_err(werr)?
    };
    let perr = |e: png::EncodingError| QrError::PngEncode {
        path: path.to_owned(),
        msg: e.to_string(),
    };
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), side as u32, side as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(perr)?;
    writer.write_image_data(&pixels).map_err(perr)?;
    writer.finish().map_err(perr)
}

/// The text of the first QR code found in a PNG (a saved code, a screenshot, a photo).
pub fn decode_png(path: &Path) -> Result<String, QrError> {
    let file = std::fs::File::open(path).map_err(|source| QrError::Read {
        path: path.to_owned(),
        source,
    })?;
    let derr = |msg: String| QrError::PngDecode {
        path: path.to_owned(),
        msg,
    };
    let mut dec = png::Decoder::new(BufReader::new(file));
    // Palette, 16-bit and sub-byte images all become 8-bit grey/RGB(A).
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(|e| derr(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| derr("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| derr(e.to_string()))?;
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = info.line_size;
    let grey = |x: usize, y: usize| -> u8 {
        let p = &buf[y * stride + x * channels..];
        match channels {
            1 | 2 => p[0],
            // Luma from RGB; alpha ignored (codes are opaque).
            _ => {
                ((u32::from(p[0]) * 299 + u32::from(p[1]) * 587 + u32::from(p[2]) * 114) / 1000)
                    as u8
            }
        }
    };
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, grey);
    let grids = img.detect_grids();
    let grid = grids
        .first()
        .ok_or_else(|| QrError::NotFound(path.to_owned()))?;
    let (_, text) = grid.decode().map_err(|e| QrError::Decode {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Token;

    #[test]
    fn token_round_trips_through_png() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::generate().encode();
        let png = dir.path().join("run/kairos/pairing.png");
        write_png(&token, &png).unwrap();
        assert_eq!(decode_png(&png).unwrap(), token);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&png).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the PNG holds the token");
        let text = render_text(&token).unwrap();
        assert!(text.contains('█') || text.contains('▀') || text.contains('▄'));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.png");
        assert!(
            decode_png(&p)
                .unwrap_err()
                .to_string()
                .contains("missing.png")
        );
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        assert!(matches!(decode_png(&junk), Err(QrError::PngDecode { .. })));
        // A valid PNG with no code in it.
        let blank = dir.path().join("blank.png");
        let f = std::fs::File::create(&blank).unwrap();
        let mut enc = png::Encoder::new(f, 64, 64);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&[255u8; 64 * 64])
            .unwrap();
        assert!(matches!(decode_png(&blank), Err(QrError::NotFound(_))));
    }
}
